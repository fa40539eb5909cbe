"""Eval metrics of the torch oracle (oracle_torch/eval.py): the five mask variants on a toy
target and the KL/CE metrics on a tiny Llama, each against a direct recomputation."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from contract.config import parse_config
from contract.draws import eval_draw_plan
from contract.resolve import resolve_run
from oracle_torch.components import DecomposedModel, SiteMode
from oracle_torch.eval import EVAL_VARIANTS, eval_ci, eval_metrics, sample_eval_draws
from oracle_torch.losses import output_divergence
from oracle_torch.state import make_state
from tests.helpers import tms_config
from tests.test_oracle_units import F64, _x

torch.set_num_threads(1)


def test_eval_metrics_toy_variants(torch_tms):
    # S13/S26: eval masks use ci_lower; ci/unmasked/rounded/zero have no delta path;
    # stochastic uses the named eval draws.
    run, state, model = torch_tms
    x = _x(8, 5, 3)
    plan = eval_draw_plan(run, (8,))
    assert [d.name for d in plan] == ["eval.linear1.source", "eval.linear1.delta", "eval.linear2.source", "eval.linear2.delta"]
    draws = sample_eval_draws(run, 0, 0, F64, (8,))
    m = eval_metrics(run, model, state.params, x, draws)
    assert set(m) == {"eval/l0/linear1", "eval/l0/linear2"} | {f"eval/mse/{v}" for v in EVAL_VARIANTS}
    clean, ci = eval_ci(run, model, state.params, x)
    with torch.no_grad():
        pred = model.masked_forward(x, {n: SiteMode(c, None, None) for n, c in ci.items()})
        stoch = model.masked_forward(x, {n: SiteMode(c + (1 - c) * draws[f"eval.{n}.source"], draws[f"eval.{n}.delta"], None)
                                         for n, c in ci.items()})
    assert m["eval/mse/ci"] == float(((pred - clean) ** 2).sum() / pred.numel())
    assert m["eval/mse/stochastic"] == float(((stoch - clean) ** 2).sum() / pred.numel())
    # zero masks, no delta: linear1 outputs 0, linear2 outputs its bias -> relu(b)
    b = model.sites["linear2"].frozen.bias
    assert m["eval/mse/zero"] == pytest.approx(float(((torch.relu(b).expand(8, 5) - clean) ** 2).mean()), rel=1e-13)
    assert m["eval/l0/linear1"] == float((ci["linear1"] > 0).sum(-1).to(F64).mean())



def test_eval_metrics_llama_kl_and_ce(tmp_path):
    # S23: llama eval reports KL(clean || masked) (mean over positions) and next-token CE.
    from oracle_torch.targets import build_target

    cfg = {"vocab_size": 16, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 32,
           "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "tie_word_embeddings": False}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = build_target("llama", cfg)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "ll.safetensors"))
    (tmp_path / "ll.json").write_text(json.dumps({"kind": "llama", "config": cfg, "training": {}}))
    d = tms_config(str(tmp_path / "ll.safetensors"))
    d.update(target={"kind": "llama", "weights": str(tmp_path / "ll.safetensors")}, output_loss="kl",
             data={"source": "corpus", "seq_len": 6}, ci_fn={"type": "shared_mlp", "hidden": [4]},
             sites=[{"pattern": "model.layers.0.mlp.*_proj", "C": 3}, {"pattern": "model.layers.0.self_attn.[qv]_proj", "C": 2}])
    run = resolve_run(parse_config(d))
    state = make_state(run, None, F64)
    model = DecomposedModel(run, state.params, F64)
    tok = torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(0))
    draws = sample_eval_draws(run, 3, 0, F64, (2, 6))
    assert draws["eval.model.layers.0.self_attn.q_proj.source"].shape == (2, 6, 2)
    met = eval_metrics(run, model, state.params, tok, draws)
    sites = [s.name for s in run.sites]
    assert set(met) == ({f"eval/l0/{s}" for s in sites} | {"eval/ce/target"}
                        | {f"eval/{k}/{v}" for k in ("kl", "ce") for v in EVAL_VARIANTS})
    clean, ci = eval_ci(run, model, state.params, tok)
    with torch.no_grad():
        pred = model.masked_forward(tok, {n: SiteMode(c, None, None) for n, c in ci.items()})
    assert met["eval/kl/ci"] == float(output_divergence("kl", pred, clean))
    assert met["eval/ce/target"] == pytest.approx(float(F.cross_entropy(clean[:, :-1].reshape(-1, 16), tok[:, 1:].reshape(-1))), rel=1e-13)
    assert all(met[f"eval/kl/{v}"] >= 0 for v in EVAL_VARIANTS)


def test_tms_recovery_scoring(tmp_path):
    # parity/tms_recovery.py: a feature is matched iff exactly one component is above the
    # threshold for it and that component is above it for no other feature.
    import numpy as np

    from parity.tms_recovery import plot_heatmap, recovery_scores, site_score, sorted_alive

    good = np.zeros((3, 6))
    good[0, 4], good[1, 1], good[2, 5] = 1.0, 0.9, 0.5
    good[0, 2] = 0.05  # below the threshold: ignored
    s = site_score(good)
    assert (s["matched"], s["alive"]) == (1.0, 3)
    shared = good.copy()
    shared[2, 1] = 0.3  # component 1 now also serves feature 2 -> features 1 and 2 unmatched
    s = site_score(shared)
    assert s["n_matched"] == 1 and s["alive"] == 3
    assert [p["components"] for p in s["per_feature"]] == [[4], [1], [1, 5]]
    assert sorted_alive(good).tolist() == [4, 1, 5]
    sc = recovery_scores(lambda x: {"a": good[x.argmax(1)], "b": shared[x.argmax(1)]}, 3)
    assert not sc["recovered"] and sc["alive_total"] == 6 and sc["matched_mean"] == pytest.approx((1 + 1 / 3) / 2)
    assert recovery_scores(lambda x: {"a": good[x.argmax(1)]}, 3)["recovered"]
    png = plot_heatmap({"a": good, "b": shared}, tmp_path / "ci.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
