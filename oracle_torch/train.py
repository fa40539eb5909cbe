"""One VPD training step and the faithfulness warmup (ALGORITHM §7; SPEC S30-S45).

`train_step` consumes the draws of the draw plan as a dict of tensors: sampled from a
torch generator in normal runs (`sample_draws`), supplied by the parity harness in parity
runs. One code path either way."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from contract.config import RunConfig
from contract.draws import DrawSpec, draw_plan
from contract.init import init_state
from contract.resolve import ResolvedRun
from contract.runlog import read_metric_lines, rewrite_metrics, with_dtype
from contract.schedules import imp_min_p, schedule_value
from contract.adversary import bundle_of
from oracle_torch.adversary import adam_ascent, fresh_pgd_term, init_source_opt, persistent_pgd_term, persistent_warmup
from oracle_torch.ci_fn import ci_logits
from oracle_torch.components import DecomposedModel, inner_act
from oracle_torch.losses import faithfulness, importance_minimality
from oracle_torch.recon import recon_term
from oracle_torch.sigmoids import ci_pair

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"runtime.dtype: the torch oracle runs float32 or float64, not {name!r}")
    return DTYPES[name]


def term_key(i: int, t) -> str:
    return f"{i}.{t.type}"


@dataclass
class TrainState:
    params: dict[str, torch.nn.Parameter]
    opt_components: torch.optim.AdamW
    opt_ci_fn: torch.optim.AdamW
    step: int = 0
    extra: dict = field(default_factory=dict)
    # persistent PGD (S82-S84): bundle -> {site: source}, bundle -> {"m", "v", "t"}
    sources: dict = field(default_factory=dict)
    source_opt: dict = field(default_factory=dict)

    def group(self, prefix: str) -> list[str]:
        return [n for n in self.params if n.startswith(prefix)]


def make_params(arrays: dict[str, np.ndarray], dtype) -> dict[str, torch.nn.Parameter]:
    return {n: torch.nn.Parameter(torch.tensor(a, dtype=dtype)) for n, a in arrays.items()}


def _adamw(params: list, oc) -> torch.optim.AdamW:
    # lr is set from the schedule every step; foreach=False keeps the per-tensor reference math
    return torch.optim.AdamW(params, lr=0.0, betas=tuple(oc.betas), eps=oc.eps,
                             weight_decay=oc.weight_decay, foreach=False)


def make_state(run: ResolvedRun, arrays: dict[str, np.ndarray] | None, dtype) -> TrainState:
    if run.cfg.runtime.mesh.data != 1:
        raise ValueError("runtime.mesh.data: the oracle trains in one process (its FSDP2 path is not "
                         "implemented); use runtime.mesh.data: 1 — the JAX trainer shards over a mesh")
    arrays = init_state(run) if arrays is None else arrays
    params = make_params({n: a for n, a in arrays.items() if not n.startswith("sources.")}, dtype)
    comp = [p for n, p in params.items() if n.startswith("components.")]
    ci = [p for n, p in params.items() if n.startswith("ci_fn.")]
    o = run.cfg.optim
    sources = {t.bundle: {s.name: torch.tensor(arrays[f"sources.{t.bundle}.{s.name}"], dtype=dtype) for s in run.sites}
               for t in run.recon_terms if t.source == "persistent_pgd"}
    return TrainState(params, _adamw(comp, o.components), _adamw(ci, o.ci_fn),
                      sources=sources, source_opt={b: init_source_opt(v) for b, v in sources.items()})


def hparams(cfg: RunConfig, step: int) -> dict[str, float]:
    """Schedule values for `step`, computed on the host (S40, S41)."""
    hp = {"lr_components": schedule_value(cfg.optim.components.lr, step, cfg.steps),
          "lr_ci_fn": schedule_value(cfg.optim.ci_fn.lr, step, cfg.steps)}
    for i, t in enumerate(cfg.loss_terms):
        if t.type == "importance_minimality":
            hp["imp_min_p"] = imp_min_p(t, step, cfg.steps)
        if t.type.startswith("persistent_pgd"):  # S84: the source LR, once per training step
            hp[f"lr_sources.{bundle_of(i, t)}"] = schedule_value(t.optimizer.lr, step, cfg.steps)
    return hp


def sample_draws(plan: list[DrawSpec], seed: int, step: int, dtype) -> dict[str, torch.Tensor]:
    """Production sampling of the draw plan with a torch generator keyed by (seed, step)."""
    g = torch.Generator().manual_seed(step_seed(seed, step))
    return {d.name: torch.rand(d.shape, generator=g, dtype=dtype) for d in plan}


def step_seed(seed: int, step: int) -> int:
    """A 63-bit generator seed per (seed, step), without collisions between nearby pairs."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}".encode()).digest()[:8], "little") >> 1


def faithfulness_warmup(run: ResolvedRun, model: DecomposedModel, params: dict) -> list[float]:
    """S44: AdamW on faithfulness alone (own lr / weight decay, no clip); the optimizer is
    discarded afterwards."""
    w = run.cfg.faithfulness_warmup
    if w.steps == 0:
        return []
    comp = [p for n, p in params.items() if n.startswith("components.")]
    opt = torch.optim.AdamW(comp, lr=w.lr, weight_decay=w.weight_decay, foreach=False)
    losses = []
    for _ in range(w.steps):
        opt.zero_grad(set_to_none=True)
        loss = faithfulness(run, model, params)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """S43: torch's clip_grad_norm_ semantics: scale = max / (norm + 1e-6), clamped to 1."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:  # e.g. a faithfulness-only config leaves the CI function without gradient
        return 0.0
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    if max_norm is not None:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef)
    return float(total)


def forward_terms(run: ResolvedRun, model: DecomposedModel, params: dict, batch, draws: dict, hp: dict,
                  record: dict | None = None, pins: dict | None = None, sources: dict | None = None):
    """Everything up to the total loss. `pins` (stage bundles) replace computed
    `ci_lower.<site>` / `ci_upper.<site>` and per-forward routes / masks with given values. Returns (total, {term_key: value}, ci_lower)."""
    cfg = run.cfg
    clean, site_inputs, z, ci_lower, ci_upper = clean_and_ci(run, model, params, batch, draws)
    pins = pins or {}
    for s in run.sites:
        ci_lower[s.name] = pins.get(f"ci_lower.{s.name}", ci_lower[s.name])
        ci_upper[s.name] = pins.get(f"ci_upper.{s.name}", ci_upper[s.name])
    if record is not None:
        record["clean_out"] = clean
        for s in run.sites:
            record[f"site_input.{s.name}"] = site_inputs[s.name]
            record[f"ci_logits.{s.name}"] = z[s.name]
            record[f"ci_lower.{s.name}"] = ci_lower[s.name]
            record[f"ci_upper.{s.name}"] = ci_upper[s.name]
    recon = {t.index: t for t in run.recon_terms}
    terms, total = {}, 0.0
    for i, t in enumerate(cfg.loss_terms):
        if t.type == "faithfulness":
            v = faithfulness(run, model, params)
        elif t.type == "importance_minimality":
            v = importance_minimality(run, ci_upper, hp["imp_min_p"], t.beta, t.eps)
        elif recon[i].source == "fresh_pgd":
            v = fresh_pgd_term(run, model, recon[i], batch, clean, ci_lower, draws, record, pins)
        elif recon[i].source == "persistent_pgd":
            v = persistent_pgd_term(run, model, recon[i], batch, clean, ci_lower, sources[recon[i].bundle], draws, record, pins)
        else:
            v = recon_term(run, model, recon[i], batch, clean, ci_lower, draws, record, pins)
        terms[term_key(i, t)] = v
        total = total + t.coeff * v
    if record is not None:
        for k, v in terms.items():
            record[f"term.{k}"] = v
        record["term.total"] = total
    return total, terms, ci_lower


def clean_and_ci(run: ResolvedRun, model: DecomposedModel, params: dict, batch, draws: dict):
    """S7, S12-S17: clean output, site inputs, CI logits, (ci_lower, ci_upper) per site."""
    clean, site_inputs = model.clean_forward(batch)
    inner = {}
    if run.cfg.ci_fn.type == "mlp":
        inner = {s.name: inner_act(s, site_inputs[s.name], params[f"components.{s.name}.V"]) for s in run.sites}
    z = ci_logits(run, params, site_inputs, inner)
    ci_lower, ci_upper = {}, {}
    for s in run.sites:
        u = draws[f"binomial.{s.name}"] if run.cfg.sampling == "binomial" else None
        ci_lower[s.name], ci_upper[s.name] = ci_pair(z[s.name], u)
    return clean, site_inputs, z, ci_lower, ci_upper


def adversary_warmup(run: ResolvedRun, model: DecomposedModel, state: TrainState, batch, draws: dict, hp: dict):
    """S84 (1): each persistent term's n_warmup detached ascents, before the main loss."""
    terms = [t for t in run.recon_terms if t.source == "persistent_pgd" and run.cfg.loss_terms[t.index].n_warmup]
    if not terms:
        return
    with torch.no_grad():
        clean, _, _, ci_lower, _ = clean_and_ci(run, model, state.params, batch, draws)
    for t in terms:
        persistent_warmup(run, model, t, batch, clean, ci_lower, state.sources[t.bundle],
                          state.source_opt[t.bundle], hp[f"lr_sources.{t.bundle}"])


def l0_per_site(ci_lower: dict) -> dict[str, float]:
    """Mean over positions of the number of components with ci_lower > 0."""
    return {n: float((c > 0).to(torch.float64).sum(-1).mean()) for n, c in ci_lower.items()}


def train_step(run: ResolvedRun, model: DecomposedModel, state: TrainState, batch, draws: dict,
               record: dict | None = None) -> dict[str, float]:
    """One step (S30): forward, backward, clip per group, AdamW per group. Returns the
    step's metrics; `record` (if a dict) receives named intermediates and gradients."""
    cfg = run.cfg
    hp = hparams(cfg, state.step)
    for p in state.params.values():
        p.grad = None
    adversary_warmup(run, model, state, batch, draws, hp)
    leaves = {b: {n: s.detach().requires_grad_(True) for n, s in srcs.items()} for b, srcs in state.sources.items()}
    total, terms, ci_lower = forward_terms(run, model, state.params, batch, draws, hp, record, sources=leaves)
    # S84 (3): the final ascent's gradient is d(term, unscaled)/d(sources) from the same graph
    # as the main backward, i.e. at the pre-update parameters
    src_grads = {}
    for t in run.recon_terms:
        if t.source == "persistent_pgd":
            lv = leaves[t.bundle]
            g = torch.autograd.grad(terms[term_key(t.index, cfg.loss_terms[t.index])], list(lv.values()), retain_graph=True)
            src_grads[t.bundle] = dict(zip(lv, g))
    total.backward()
    metrics = {f"loss/{k}": float(v.detach()) for k, v in terms.items()}
    metrics["loss/total"] = float(total.detach())
    for n, p in state.params.items():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        metrics[f"grad_norm/{n}"] = float(torch.linalg.vector_norm(g))
        if record is not None:
            record[f"grad.{n}"] = g.detach().clone()
    comp, ci = state.group("components."), state.group("ci_fn.")
    metrics["grad_norm/components"] = clip_grad_norm([state.params[n] for n in comp], cfg.optim.components.clip)
    metrics["grad_norm/ci_fn"] = clip_grad_norm([state.params[n] for n in ci], cfg.optim.ci_fn.clip)
    for grp in state.opt_components.param_groups:
        grp["lr"] = hp["lr_components"]
    for grp in state.opt_ci_fn.param_groups:
        grp["lr"] = hp["lr_ci_fn"]
    state.opt_components.step()
    state.opt_ci_fn.step()
    for t in run.recon_terms:
        if t.source == "persistent_pgd":
            if record is not None:
                for n, g in src_grads[t.bundle].items():
                    record[f"grad.sources.{t.bundle}.{n}"] = g.detach().clone()
            state.sources[t.bundle] = {n: s.detach() for n, s in leaves[t.bundle].items()}
            adam_ascent(state.sources[t.bundle], src_grads[t.bundle], state.source_opt[t.bundle],
                        hp[f"lr_sources.{t.bundle}"], cfg.loss_terms[t.index].optimizer)
            for n, g in src_grads[t.bundle].items():
                metrics[f"grad_norm/sources.{t.bundle}.{n}"] = float(torch.linalg.vector_norm(g))
            metrics[f"param_norm/sources.{t.bundle}"] = math.sqrt(sum(float((v ** 2).sum()) for v in state.sources[t.bundle].values()))
    with torch.no_grad():
        metrics["param_norm/components"] = math.sqrt(sum(float((state.params[n] ** 2).sum()) for n in comp))
        metrics["param_norm/ci_fn"] = math.sqrt(sum(float((state.params[n] ** 2).sum()) for n in ci))
    metrics |= {f"l0/{n}": v for n, v in l0_per_site(ci_lower).items()}
    metrics |= {f"sched/{k}": v for k, v in hp.items()}
    state.step += 1
    return metrics


def draws_for_step(run: ResolvedRun, step: int, dtype, batch_shape=None) -> dict[str, torch.Tensor]:
    return sample_draws(draw_plan(run, batch_shape), run.cfg.seed, step, dtype)


# ---------------------------------------------------------------- the training loop
def train(run: ResolvedRun, out_dir, dtype=None, resume: bool = True, progress: bool = True) -> dict:
    """Train `run` into `out_dir` (metrics.jsonl, checkpoints/). Returns a summary.

    - Resumes from the latest checkpoint of `out_dir` (refused under another config);
      `resume=False` starts afresh, clearing the old checkpoints and metrics of `out_dir`.
    - The faithfulness warmup runs only for a fresh start (S44).
    - Line `{"step": k, ...}` of metrics.jsonl holds the metrics of training step k (params
      before its update; every `log_every` steps and the last step) and the eval of the
      params before step k (every `eval.every` steps); a final line `{"step": steps, eval}`
      evaluates the trained params. On resume from a checkpoint at step k (k steps done)
      lines with step >= k are dropped first, so the file matches an uninterrupted run.
    - Checkpoints every `checkpoint.every` steps and at the end. SIGINT/SIGTERM stop the
      run between two steps and save a checkpoint at the current step (a second signal
      aborts at once, without saving: the last good checkpoint stands).
    """
    import json
    import os
    import shutil
    import signal
    import sys
    import threading
    from pathlib import Path

    from tqdm import tqdm

    from contract.data import batch_for_step
    from oracle_torch.checkpoint import checkpoint_root, latest_checkpoint, load_checkpoint, save_checkpoint
    from oracle_torch.eval import evaluate, to_torch_batch

    if dtype is not None:
        name = dtype if isinstance(dtype, str) else {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))
        torch_dtype(name)
        run = with_dtype(run, name)
    cfg = run.cfg
    dt = torch_dtype(cfg.runtime.dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"

    ckpt = latest_checkpoint(out) if resume else None
    if not resume:
        shutil.rmtree(checkpoint_root(out), ignore_errors=True)
    if ckpt is not None:
        state = load_checkpoint(ckpt, run, dt)
    else:
        state = make_state(run, None, dt)
    rewrite_metrics(metrics_path, read_metric_lines(metrics_path, state.step))
    model = DecomposedModel(run, state.params, dt)
    if ckpt is None:
        warm = faithfulness_warmup(run, model, state.params)
        if warm:
            state.extra["faithfulness_warmup"] = {"steps": len(warm), "first": warm[0], "last": warm[-1]}
    start = state.step
    saved_at = start if ckpt is not None else None
    ck_every, ev_every = cfg.checkpoint.every, cfg.eval.every

    stop = {"signum": None}
    old_handlers = {}

    def _on_signal(signum, frame):
        if stop["signum"] is not None:  # second signal: abort now, no save
            raise KeyboardInterrupt
        stop["signum"] = signum
        print(f"\nvpd-oracle: {signal.Signals(signum).name} received: stopping after this step and saving a "
              "checkpoint (send it again to abort without saving)", file=sys.stderr, flush=True)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old_handlers[sig] = signal.signal(sig, _on_signal)

    def _save(step: int) -> Path:
        mf.flush()
        os.fsync(mf.fileno())
        return save_checkpoint(out, state, run, step, cfg.checkpoint.keep, dt)

    last_train, last_eval, last_ckpt = {}, {}, ckpt
    pbar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc="vpd-oracle", dynamic_ncols=True)
    try:
        with open(metrics_path, "a") as mf:
            while state.step < cfg.steps:
                if stop["signum"] is not None:
                    break
                k = state.step
                line: dict = {}
                if ev_every and k % ev_every == 0:
                    last_eval = evaluate(run, model, state.params, k, dt)
                    line |= last_eval
                batch = to_torch_batch(batch_for_step(run, cfg.seed, k), dt)
                m = train_step(run, model, state, batch, draws_for_step(run, k, dt))
                if k % cfg.log_every == 0 or k == cfg.steps - 1:
                    last_train = m
                    line |= m
                if k == 0 and "faithfulness_warmup" in state.extra:
                    fw = state.extra["faithfulness_warmup"]
                    line |= {"warmup/faithfulness_first": fw["first"], "warmup/faithfulness_last": fw["last"]}
                if line:
                    mf.write(json.dumps({"step": k, **line}) + "\n")
                    mf.flush()
                pbar.update(1)
                pbar.set_postfix(loss=f"{m['loss/total']:.4g}", refresh=False)
                if ck_every and state.step % ck_every == 0 and state.step < cfg.steps:
                    last_ckpt, saved_at = _save(state.step), state.step
            interrupted = stop["signum"] is not None
            if not interrupted and ev_every:
                last_eval = evaluate(run, model, state.params, cfg.steps, dt)
                mf.write(json.dumps({"step": cfg.steps, **last_eval}) + "\n")
                mf.flush()
            if saved_at != state.step:
                last_ckpt, saved_at = _save(state.step), state.step
    finally:
        pbar.close()
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
    return {
        "start_step": start,
        "step": state.step,
        "steps": cfg.steps,
        "interrupted": interrupted,
        "signal": None if stop["signum"] is None else signal.Signals(stop["signum"]).name,
        "final_metrics": last_train,
        "final_eval": last_eval,
        "metrics_path": str(metrics_path),
        "checkpoint_dir": str(checkpoint_root(out)),
        "last_checkpoint": None if last_ckpt is None else str(last_ckpt),
        "config_hash": cfg.hash(),
    }
