"""Deterministic pretraining of the shipped targets into contract/weights/.

    python -m oracle_torch.pretrain [--only NAME] [--out DIR]

Writes `<name>.safetensors` (Hugging Face layout, float32) and `<name>.json`
({"kind", "config", "training"}) for each target. Runs on one CPU thread; data come from
contract.data (sparse features) and contract.corpus (token windows).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from contract.corpus import corpus_tokens
from contract.data import resid_mlp_batch, tms_batch, token_windows
from contract.targets import WEIGHTS_DIR
from oracle_torch.targets import build_target, target_forward

# ---------------------------------------------------------------- recipes
# one recipe: {"config": the target's hyper-parameters, then the training settings}
Spec = dict[str, Any]

TMS_SPECS: dict[str, Spec] = {
    "tms_5-2": dict(config=dict(n_features=5, n_hidden=2, feature_probability=0.05),
                    steps=5000, lr=1e-2, batch=1024, seed=0),
    "tms_40-10": dict(config=dict(n_features=40, n_hidden=10, feature_probability=0.05),
                      steps=5000, lr=1e-2, batch=1024, seed=0),
}
RESID_SPECS: dict[str, Spec] = {
    "resid_mlp1": dict(config=dict(n_features=100, d_embed=1000, d_mlp=50, n_layers=1,
                                   feature_probability=0.01, embed_seed=0),
                       steps=2500, lr=3e-3, batch=256, seed=0),
    "resid_mlp2": dict(config=dict(n_features=100, d_embed=1000, d_mlp=25, n_layers=2,
                                   feature_probability=0.01, embed_seed=0),
                       steps=2500, lr=3e-3, batch=256, seed=0),
}
LLAMA_SPEC: Spec = dict(
    config=dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=24, intermediate_size=172,
                max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6,
                tie_word_embeddings=False, hidden_act="silu", attention_bias=False, mlp_bias=False),
    steps=1000, lr=3e-3, warmup=100, final_lr_frac=0.1, weight_decay=0.01, batch=16,
    seq_len=128, seed=0, clip=1.0, eval_windows=64, eval_seed=12345,
)
ALL = list(TMS_SPECS) + list(RESID_SPECS) + ["tiny_llama"]


def _save(out_dir: Path, name: str, kind: str, config: dict, training: dict, tensors: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float32).clone().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(out_dir / f"{name}.safetensors"))
    meta = {"kind": kind, "config": config, "training": training}
    (out_dir / f"{name}.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- TMS
def train_tms(name: str, out_dir: Path) -> dict:
    spec = TMS_SPECS[name]
    cfg = spec["config"]
    torch.manual_seed(spec["seed"])
    f, h = cfg["n_features"], cfg["n_hidden"]
    # tied weights: W [n_hidden, n_features] (= linear1.weight), linear2.weight = W.T
    W = torch.nn.Parameter(torch.empty(h, f))
    torch.nn.init.xavier_normal_(W)
    b = torch.nn.Parameter(torch.zeros(f))
    opt = torch.optim.Adam([W, b], lr=spec["lr"])
    loss_v = float("nan")
    for step in range(spec["steps"]):
        x = torch.from_numpy(tms_batch(spec["seed"], step, spec["batch"], cfg)).float()
        out = torch.relu((x @ W.T) @ W + b)
        loss = ((out - x) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_v = loss.item()
    final = _eval_mse(lambda x: torch.relu((x @ W.T) @ W + b), lambda x: x, tms_batch, spec, cfg)
    norms = W.detach().norm(dim=0)
    training = dict(steps=spec["steps"], lr=spec["lr"], batch=spec["batch"], seed=spec["seed"],
                    optimizer="adam", loss="mse(relu(W.T W x + b), x), importance 1",
                    tied_weights=True, last_step_loss=loss_v, final_loss=final,
                    zero_output_loss=_eval_mse(lambda x: torch.zeros_like(x), lambda x: x, tms_batch, spec, cfg),
                    n_features_represented=int((norms > 0.5).sum()))
    tensors = {"linear1.weight": W.detach(), "linear2.weight": W.detach().T, "linear2.bias": b.detach()}
    _save(out_dir, name, "tms", cfg, training, tensors)
    return training


def _eval_mse(fn, label_fn, batch_fn, spec, cfg, n_batches: int = 4) -> float:
    """MSE on fixed evaluation batches drawn from a stream disjoint from training."""
    tot = 0.0
    with torch.no_grad():
        for k in range(n_batches):
            x = torch.from_numpy(batch_fn(spec["seed"] + 1_000_003, k, 4096, cfg)).float()
            tot += float(((fn(x) - label_fn(x)) ** 2).mean())
    return tot / n_batches


# ---------------------------------------------------------------- ResidMLP
def _resid_label(x: torch.Tensor) -> torch.Tensor:
    return x + torch.relu(x)


def train_resid(name: str, out_dir: Path) -> dict:
    spec = RESID_SPECS[name]
    cfg = spec["config"]
    torch.manual_seed(spec["seed"])
    model = build_target("resid_mlp", cfg)
    opt = torch.optim.Adam([p for p in model.parameters()], lr=spec["lr"])
    loss_v = float("nan")
    for step in range(spec["steps"]):
        lr = spec["lr"] * 0.5 * (1 + math.cos(math.pi * step / spec["steps"]))
        for g in opt.param_groups:
            g["lr"] = lr
        x = torch.from_numpy(resid_mlp_batch(spec["seed"], step, spec["batch"], cfg)).float()
        loss = ((model(x) - _resid_label(x)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_v = loss.item()
    model.eval()
    final = _eval_mse(model, _resid_label, resid_mlp_batch, spec, cfg)
    # reference points: identity (residual path only, no MLP) and a zero output
    ident = _eval_mse(lambda x: x @ model.W_E @ model.W_E.T, _resid_label, resid_mlp_batch, spec, cfg)
    training = dict(steps=spec["steps"], lr=spec["lr"], lr_schedule="cosine to 0", batch=spec["batch"],
                    seed=spec["seed"], optimizer="adam",
                    label="x + relu(x): the residual stream carries x, the MLPs compute relu of each "
                          "feature in superposition; input features U[-1,1] with probability p",
                    loss="mse(out, x + relu(x)), mean over batch and features",
                    last_step_loss=loss_v, final_loss=final, residual_only_loss=ident)
    tensors = dict(model.state_dict())
    _save(out_dir, name, "resid_mlp", cfg, training, tensors)
    return training


# ---------------------------------------------------------------- tiny Llama
def _lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = target_forward(model, "llama", ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def heldout_lm_loss(model, n_windows: int = 64, seq_len: int = 128, seed: int = 12345) -> float:
    """Mean next-byte cross-entropy (nats) on fixed windows of the held-out corpus split."""
    ids = torch.from_numpy(token_windows(corpus_tokens("heldout"), seed, 0, n_windows, seq_len + 1))
    with torch.no_grad():
        return float(_lm_loss(model, ids))


def train_llama(out_dir: Path, name: str = "tiny_llama") -> dict:
    from transformers import LlamaConfig

    spec = LLAMA_SPEC
    hf_cfg = LlamaConfig(**spec["config"]).to_dict()
    torch.manual_seed(spec["seed"])
    model = build_target("llama", hf_cfg)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=spec["lr"], betas=(0.9, 0.95))
    tokens = corpus_tokens("train")
    steps, warm = spec["steps"], spec["warmup"]
    loss_v, ema = float("nan"), None
    for step in range(steps):
        if step < warm:
            lr = spec["lr"] * (step + 1) / warm
        else:
            t = (step - warm) / max(1, steps - warm)
            lr = spec["lr"] * (spec["final_lr_frac"] + (1 - spec["final_lr_frac"]) * 0.5 * (1 + math.cos(math.pi * t)))
        for g in opt.param_groups:
            g["lr"] = lr
        ids = torch.from_numpy(token_windows(tokens, spec["seed"], step, spec["batch"], spec["seq_len"] + 1))
        loss = _lm_loss(model, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec["clip"])
        opt.step()
        loss_v = loss.item()
        ema = loss_v if ema is None else 0.98 * ema + 0.02 * loss_v
        if step % 250 == 0 or step == steps - 1:
            print(f"  [{name}] step {step:5d} loss {loss_v:.4f} ema {ema:.4f} lr {lr:.2e}", flush=True)
    model.eval()
    held = heldout_lm_loss(model, spec["eval_windows"], spec["seq_len"], spec["eval_seed"])
    training = dict(steps=steps, lr=spec["lr"], warmup=warm, lr_schedule="linear warmup, cosine to 10%",
                    weight_decay=spec["weight_decay"], betas=[0.9, 0.95], grad_clip=spec["clip"],
                    optimizer="adamw", batch=spec["batch"], seq_len=spec["seq_len"], seed=spec["seed"],
                    data="contract.corpus train split, token_windows(seed, step, batch, seq_len + 1)",
                    final_loss=loss_v, final_loss_ema=ema, heldout_loss_nats=held,
                    heldout_eval=dict(split="heldout", n_windows=spec["eval_windows"],
                                      seq_len=spec["seq_len"], seed=spec["eval_seed"]),
                    uniform_baseline_nats=math.log(256))
    _save(out_dir, name, "llama", hf_cfg, training, dict(model.state_dict()))
    return training


# ---------------------------------------------------------------- entry point
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=ALL, action="append", help="train only this target (repeatable)")
    ap.add_argument("--out", default=str(WEIGHTS_DIR), help="output directory (default contract/weights)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    names = args.only or ALL
    t_all = time.time()
    for name in names:
        t0 = time.time()
        if name in TMS_SPECS:
            r = train_tms(name, out)
        elif name in RESID_SPECS:
            r = train_resid(name, out)
        else:
            r = train_llama(out, name)
        extra = f" heldout {r['heldout_loss_nats']:.4f} nats" if "heldout_loss_nats" in r else ""
        print(f"{name}: final_loss {r['final_loss']:.6g}{extra} ({time.time() - t0:.1f}s)", flush=True)
    print(f"total {time.time() - t_all:.1f}s")


if __name__ == "__main__":
    main()
