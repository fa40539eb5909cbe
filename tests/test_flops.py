"""The analytic model-FLOPs count (contract/flops.py, S121): by hand on TMS, linear in C,
and against XLA's own count of the compiled JAX step on a small Llama."""
from __future__ import annotations

import json

import pytest

from contract.config import parse_config
from contract.config_file import load_config
from contract.flops import forward_flops, step_flops
from contract.resolve import resolve_run
from contract.targets import REPO_ROOT


def _run(d: dict):
    return resolve_run(parse_config(d, "test"))


def _tms(terms: list[dict], C: int = 3, B: int = 4) -> dict:
    d = load_config(REPO_ROOT / "configs" / "tms_5-2.yaml").to_dict()
    d.update(batch_size=B, sites=[{"pattern": "linear1", "C": C}, {"pattern": "linear2", "C": C}], loss_terms=terms)
    d["ci_fn"] = {"type": "shared_mlp", "hidden": [7]}
    return d


def test_per_site_forward_skips_the_clean_prefix():
    # a per-site forward of linear2 repeats the clean forward's linear1 (frozen, no gradient):
    # only linear2's products count
    run = _run(_tms([{"type": "stochastic_recon_layerwise", "coeff": 1.0}]))
    only2 = forward_flops(run, {"linear2": (True, False)}, "train")
    C = 3
    assert only2.fwd == 2 * (2 * C + C * 5 + 2 * 5)
    assert forward_flops(run, {}, "none").fwd == 2 * (5 * 2 + 2 * 5)


def test_tms_step_by_hand():
    # TMS 5 -> 2 -> 5, C=3 per site, batch 4, one stochastic_recon forward (delta on) + faithfulness
    run = _run(_tms([{"type": "faithfulness", "coeff": 1.0}, {"type": "stochastic_recon", "coeff": 1.0}]))
    f = step_flops(run)
    B, C = 4, 3
    clean = 2 * (5 * 2 + 2 * 5) * B
    ci = 2 * ((5 * 7 + 7 * C) + (2 * 7 + 7 * C)) * B  # shared_mlp d_in -> 7 -> C per site
    ci_bwd = 2 * ((5 * 7 + 2 * 7) + 2 * (7 * C + 7 * C)) * B  # first layer dW only (inputs detached)
    # masked forward: linear1 (input has no gradient): xV (dV), (xV.m)U (dX, dU), xW (none)
    l1 = 2 * (5 * C + C * 2 + 5 * 2)
    l1_bwd = 2 * (5 * C + 2 * C * 2)
    # linear2 (input carries a gradient): every product's dX, plus dV and dU
    l2 = 2 * (2 * C + C * 5 + 2 * 5)
    l2_bwd = 2 * (2 * 2 * C + 2 * C * 5 + 2 * 5)
    faith = 2 * (5 * C * 2 + 2 * C * 5)
    assert f.parts["clean forward"].fwd == clean and f.parts["clean forward"].bwd == 0
    assert (f.parts["ci_fn"].fwd, f.parts["ci_fn"].bwd) == (ci, ci_bwd)
    assert (f.parts["t1 stochastic_recon"].fwd, f.parts["t1 stochastic_recon"].bwd) == ((l1 + l2) * B, (l1_bwd + l2_bwd) * B)
    assert (f.parts["faithfulness"].fwd, f.parts["faithfulness"].bwd) == (faith, 2 * faith)
    assert f.total == clean + ci + ci_bwd + (l1 + l2 + l1_bwd + l2_bwd) * B + 3 * faith


def test_ascents_add_forward_and_input_gradients_only():
    base = [{"type": "stochastic_recon", "coeff": 1.0}]
    pgd = {"type": "pgd_recon", "coeff": 1.0, "n_steps": 3}
    run0, run3 = _run(_tms(base)), _run(_tms(base + [pgd]))
    f3 = step_flops(run3)
    live = {"linear1": (True, False), "linear2": (True, False)}
    ascent = forward_flops(run3, live, "sources")
    train = forward_flops(run3, live, "train")
    assert f3.parts["t1 pgd_recon ascents"].total == 3 * 4 * ascent.total
    assert ascent.fwd == train.fwd and 0 < ascent.bwd < train.bwd  # no dV / dU in an ascent
    assert f3.total - step_flops(run0).total == 4 * (3 * ascent.total + train.total)


def test_scaled_llama_is_linear_in_C():
    d = load_config(REPO_ROOT / "configs" / "llama_scaled.yaml").to_dict()

    def total(k: float) -> float:
        e = json.loads(json.dumps(d))
        e["sites"] = [{**s, "C": int(s["C"] * k)} for s in e["sites"]]
        return step_flops(_run(e)).total

    f1, f2, f4 = total(1), total(2), total(4)
    assert f2 - f1 > 0.3 * f1  # the components are a large share of the step
    assert f4 - f2 == pytest.approx(2 * (f2 - f1), rel=1e-12)  # a + b·C exactly


# ---------------------------------------------------------------- against XLA
def _small_llama(C: int, terms: list[dict]) -> dict:
    # the first live site is layer 0's q_proj, so no product precedes every live site
    d = load_config(REPO_ROOT / "configs" / "tiny_llama.yaml").to_dict()
    d["batch_size"], d["data"]["seq_len"] = 2, 16
    d["sites"] = [{"pattern": "model.layers.0.self_attn.*_proj", "C": C},
                  {"pattern": "model.layers.1.mlp.*_proj", "C": 2 * C}]
    d["loss_terms"] = d["loss_terms"] + terms
    return d


def _xla_cost(d: dict) -> tuple[float, dict]:
    from contract.data import batch_for_step
    from jax_impl.cost import step_cost
    from loop.backends import make_backend

    run = _run(d)
    b = make_backend("jax", run)
    return step_flops(run).total, step_cost(b, b.new_state(), 0, batch_for_step(run, 0, 0))


@pytest.mark.parametrize("C", [4, 8])
def test_matches_xla_dots_for_mask_sources(C, jax_fast_compiles):
    # stochastic_recon + stochastic_recon_subset (stacked, S28b) + faithfulness + imp-min:
    # every dot XLA runs is one the count names, and nothing else is a dot
    analytic, cost = _xla_cost(_small_llama(C, []))
    assert cost["dot_flops"] / analytic == pytest.approx(1.0, abs=1e-3)
    # XLA's unoptimised count adds the elementwise work (masks, norms, softmax, KL): a few percent
    assert 1.0 < cost["flops_unoptimised"] / analytic < 1.15


def test_matches_xla_dots_with_adversaries_and_per_site_plans():
    # fresh PGD (one ascent: XLA counts a scan body once), persistent PGD with warmup ascents,
    # a per-site plan: within the band S121 states
    terms = [{"type": "pgd_recon", "coeff": 1.0, "n_steps": 1},
             {"type": "persistent_pgd_recon", "coeff": 1.0, "n_warmup": 1},
             {"type": "ci_masked_recon_layerwise", "coeff": 1.0}]
    analytic, cost = _xla_cost(_small_llama(4, terms))
    assert 0.97 < cost["dot_flops"] / analytic < 1.05
