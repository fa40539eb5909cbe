"""Unit tests of the torch oracle's building blocks, each against a hand computation.
Every test cites the SPEC.md invariant it guards."""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import cast

import pytest
import torch
import torch.nn.functional as F

from contract.config import parse_config
from contract.resolve import ResolvedRun, resolve_run
from oracle_torch.components import DecomposedModel, SiteMode
from oracle_torch.eval import next_token_ce
from oracle_torch.losses import faithfulness, importance_minimality, output_divergence
from oracle_torch.sigmoids import ALPHA, ci_pair, lower_leaky_hard, upper_leaky_hard
from oracle_torch.state import make_state
from oracle_torch.train import clip_grad_norm, faithfulness_warmup
from tests.helpers import tms_config, write_tiny_tms

torch.set_num_threads(1)
F64 = torch.float64


# ---------------------------------------------------------------- helpers (fixture `torch_tms`: tests/conftest.py)
def _x(n=6, f=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, f, generator=g, dtype=F64)


# ---------------------------------------------------------------- S10 / S11 / S12
def test_lower_leaky_backward_every_regime_and_tie():
    # S10: z <= 0 -> alpha*g only where g < 0; 0 < z <= 1 -> g; z > 1 -> 0. Ties z=0 (first
    # regime) and z=1 (second regime), both gradient signs.
    zs = [-2.0, 0.0, 0.3, 1.0, 1.5]
    for sign in (+1.0, -1.0):
        z = torch.tensor(zs, dtype=F64, requires_grad=True)
        g = torch.full((5,), 0.7 * sign, dtype=F64)
        out = lower_leaky_hard(z)
        assert out.tolist() == [0.0, 0.0, 0.3, 1.0, 1.0]
        (gz,) = torch.autograd.grad(out, z, g)
        below = ALPHA * 0.7 * sign if sign < 0 else 0.0
        expected = [below, below, 0.7 * sign, 0.7 * sign, 0.0]
        assert gz.tolist() == pytest.approx(expected, abs=0, rel=1e-15)
    # the tie z=0 with g<0 passes alpha*g (not g), z=1 passes g (not 0)
    z = torch.tensor([0.0, 1.0], dtype=F64, requires_grad=True)
    (gz,) = torch.autograd.grad(lower_leaky_hard(z), z, torch.tensor([-1.0, -1.0], dtype=F64))
    assert gz.tolist() == [-ALPHA, -1.0]


def test_upper_leaky_values_and_gradients_with_ties():
    # S11: z > 1 -> 1 + alpha(z-1); z < 0 -> 0; else z; derivative 1 at both ties.
    z = torch.tensor([-2.0, 0.0, 0.3, 1.0, 1.5], dtype=F64, requires_grad=True)
    out = upper_leaky_hard(z)
    assert out.tolist() == pytest.approx([0.0, 0.0, 0.3, 1.0, 1.0 + ALPHA * 0.5], rel=1e-15)
    for g in (1.0, -2.0):
        (gz,) = torch.autograd.grad(upper_leaky_hard(z), z, torch.full((5,), g, dtype=F64))
        assert gz.tolist() == pytest.approx([0.0, g, g, g, ALPHA * g], rel=1e-15)


def test_binomial_ci_pair():
    # S12: ci_lower = lower(1.05 z - 0.05 u); ci_upper = upper(z), independent of u.
    z = torch.tensor([-0.1, 0.02, 0.5, 0.97, 1.2], dtype=F64, requires_grad=True)
    u = torch.tensor([0.3, 0.9, 0.1, 0.2, 0.5], dtype=F64)
    lo, up = ci_pair(z, u)
    assert torch.equal(lo, (1.05 * z - 0.05 * u).clamp(0, 1))
    assert torch.equal(up, upper_leaky_hard(z))
    (gz,) = torch.autograd.grad(lo.sum(), z)
    # 1.05 z - 0.05 u: [-0.12, -0.024, 0.52, 1.0085, 1.235] -> regimes 0, 0, pass, 0, 0
    assert gz.tolist() == pytest.approx([0.0, 0.0, 1.05, 0.0, 0.0])


# ---------------------------------------------------------------- S21 / S22 / S23
def test_importance_minimality_hand_computation_two_sites_different_C():
    # S22: S_sc = sum over all positions of (ci_upper + eps)^p; term = sum_s sum_c
    # [S/N + beta (S/N) log2(1 + S)], sites never merged, N = #positions.
    g = torch.Generator().manual_seed(3)
    cu = {"a": 1.2 * torch.rand(2, 3, 3, generator=g, dtype=F64),   # [B, T, C=3], N = 6
          "b": 1.2 * torch.rand(2, 3, 2, generator=g, dtype=F64)}   # C = 2
    # a stand-in run: importance_minimality reads only run.sites[*].name / .C
    run = cast(ResolvedRun, SimpleNamespace(sites=[SimpleNamespace(name="a", C=3), SimpleNamespace(name="b", C=2)]))
    p, beta, eps = 1.7, 0.4, 1e-3
    expected = 0.0
    for name, C in (("a", 3), ("b", 2)):
        vals = cu[name].reshape(-1, C).tolist()
        N = len(vals)
        for c in range(C):
            S = sum((row[c] + eps) ** p for row in vals)
            expected += S / N + beta * (S / N) * math.log2(1 + S)
    got = importance_minimality(run, cu, p, beta, eps)
    assert float(got) == pytest.approx(expected, rel=1e-13)
    # the log takes the GLOBAL sum: the mean of two half-batch values (a per-shard log) differs
    half = importance_minimality(run, {k: v[:1] for k, v in cu.items()}, p, beta, eps)
    half2 = importance_minimality(run, {k: v[1:] for k, v in cu.items()}, p, beta, eps)
    assert abs(float(half + half2) / 2 - expected) > 1e-6


def test_kl_direction_and_per_position_mean():
    # S23: kl = mean over positions of KL(softmax(clean) || softmax(masked)).
    clean = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [1.0, 3.0, 0.5]],
                          [[-2.0, 1.0, 4.0], [0.3, -0.3, 0.0], [5.0, 0.0, 0.0]]], dtype=F64)
    masked = torch.tensor([[[0.0, 1.0, 0.0], [3.0, -1.0, 0.0], [1.0, 0.0, 2.0]],
                           [[0.0, 0.0, 0.0], [2.0, 2.0, -2.0], [0.0, 1.0, 0.0]]], dtype=F64)

    def kl(p_logits, q_logits):
        p = [math.exp(v) for v in p_logits]
        q = [math.exp(v) for v in q_logits]
        zp, zq = sum(p), sum(q)
        return sum(pi / zp * math.log((pi / zp) / (qi / zq)) for pi, qi in zip(p, q, strict=True))

    pos = [(b, t) for b in range(2) for t in range(3)]
    fwd = sum(kl(clean[b, t].tolist(), masked[b, t].tolist()) for b, t in pos) / len(pos)
    rev = sum(kl(masked[b, t].tolist(), clean[b, t].tolist()) for b, t in pos) / len(pos)
    got = float(output_divergence("kl", masked, clean))
    assert got == pytest.approx(fwd, rel=1e-12)
    assert abs(fwd - rev) > 1e-2  # the directions differ, so the test tells them apart
    # per-position MEAN, not sum over positions and not a batchmean over B only
    assert abs(got - fwd * len(pos)) > 1e-2 and abs(got - fwd * 3) > 1e-2


def test_mse_is_sum_over_numel():
    # S23: mse = sum (pred - target)^2 / numel
    a, b = _x(4, 3, 1), _x(4, 3, 2)
    assert float(output_divergence("mse", a, b)) == pytest.approx(float(((a - b) ** 2).sum()) / 12, rel=1e-14)


def test_faithfulness_normalised_over_all_sites():
    # S21: sum_s ||W_s - V_s U_s||^2 / sum_s numel(W_s), not a mean of per-site means.
    g = torch.Generator().manual_seed(5)
    W = {"a": torch.randn(3, 4, generator=g, dtype=F64), "b": torch.randn(5, 2, generator=g, dtype=F64)}
    P = {"components.a.V": torch.randn(3, 2, generator=g, dtype=F64), "components.a.U": torch.randn(2, 4, generator=g, dtype=F64),
         "components.b.V": torch.randn(5, 3, generator=g, dtype=F64), "components.b.U": torch.randn(3, 2, generator=g, dtype=F64)}
    # stand-ins: faithfulness reads only run.sites[*].name and model.weight(name)
    run = cast(ResolvedRun, SimpleNamespace(sites=[SimpleNamespace(name="a"), SimpleNamespace(name="b")]))
    model = cast(DecomposedModel, SimpleNamespace(weight=lambda n: W[n]))
    sq = {n: sum(v * v for v in (W[n] - P[f"components.{n}.V"] @ P[f"components.{n}.U"]).reshape(-1).tolist()) for n in W}
    expected = (sq["a"] + sq["b"]) / (12 + 10)
    assert float(faithfulness(run, model, P)) == pytest.approx(expected, rel=1e-13)
    assert abs(expected - (sq["a"] / 12 + sq["b"] / 10) / 2) > 1e-3


# ---------------------------------------------------------------- S5 / S6
def test_non_live_site_gets_no_component_gradient_and_runs_frozen_path(torch_tms):
    # S5: only linear1 live -> linear2 runs F.linear exactly and gets no V/U gradient.
    run, state, model = torch_tms
    x = _x()
    mask = torch.rand(6, 4, dtype=F64)
    out = model.masked_forward(x, {"linear1": SiteMode(mask, torch.rand(6, dtype=F64), None)})
    out.sum().backward()
    p = state.params
    assert p["components.linear2.V"].grad is None and p["components.linear2.U"].grad is None
    assert float(p["components.linear1.V"].grad.abs().sum()) > 0 and float(p["components.linear1.U"].grad.abs().sum()) > 0
    # only linear2 live: linear1 (non-live) output, i.e. linear2's input, is F.linear bit for bit
    cap: dict = {}
    with model._modes({"linear2": SiteMode(torch.rand(6, 3, dtype=F64), None, None)}, cap):
        model.target(x)
    w1 = model.sites["linear1"].frozen.weight
    assert torch.equal(cap["linear2"], F.linear(x, w1))


def test_routed_out_positions_equal_frozen_output_bitwise(torch_tms):
    # S6: positions with route False take the frozen output of the same input, bit for bit.
    run, state, model = torch_tms
    x = _x()
    route = torch.tensor([True, False, True, False, False, True])
    site = model.sites["linear1"]
    mask, dm = torch.rand(6, 4, dtype=F64), torch.rand(6, dtype=F64)
    with torch.no_grad():
        site.mode = SiteMode(mask, dm, route)
        y = site(x)
        site.mode = SiteMode(mask, dm, None)
        dec = site(x)
        site.mode = None
        frozen = F.linear(x, site.frozen.weight, site.frozen.bias)
    assert torch.equal(y[~route], frozen[~route])
    assert torch.equal(y[route], dec[route]) and not torch.equal(y[route], frozen[route])
    # whole model, both sites routed out at the same positions -> the clean output there
    clean, _ = model.clean_forward(x)
    modes = {"linear1": SiteMode(torch.rand(6, 4, dtype=F64), torch.rand(6, dtype=F64), route),
             "linear2": SiteMode(torch.rand(6, 3, dtype=F64), torch.rand(6, dtype=F64), route)}
    with torch.no_grad():
        out = model.masked_forward(x, modes)
    assert torch.equal(out[~route], clean[~route])


# ---------------------------------------------------------------- S43 / S44
@pytest.mark.parametrize("max_norm", [0.05, 1e6, None])
def test_clip_grad_norm_matches_torch(max_norm):
    # S43: per group, torch's clip_grad_norm_ (scale min(max/(total+1e-6), 1)).
    g = torch.Generator().manual_seed(7)
    ours = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=F64)) for s in ((3, 4), (5,), (2, 2, 2))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, ref, strict=True):
        a.grad = torch.randn(a.shape, generator=g, dtype=F64)
        b.grad = a.grad.clone()
    total = clip_grad_norm(ours, max_norm)
    if max_norm is None:  # no clip: the norm is reported, the gradients are untouched
        ref_total = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in ref])))
    else:
        ref_total = float(torch.nn.utils.clip_grad_norm_(ref, max_norm, foreach=False))
    assert total == pytest.approx(ref_total, rel=1e-14)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-14, atol=0)
    if max_norm == 0.05:
        grads = [p.grad for p in ours if p.grad is not None]
        assert len(grads) == len(ours)  # every gradient was set above
        assert float(torch.linalg.vector_norm(torch.cat([gr.reshape(-1) for gr in grads]))) == pytest.approx(0.05, rel=1e-4)


def test_faithfulness_warmup_only_touches_components(tmp_path):
    # S44: AdamW on faithfulness alone, V/U only; its optimizer is discarded.
    run = resolve_run(parse_config(tms_config(write_tiny_tms(tmp_path, rng="torch"), faithfulness_warmup={"steps": 5, "lr": 1e-2})))
    state = make_state(run, None, F64)
    model = DecomposedModel(run, state.params, F64)
    before = {n: p.detach().clone() for n, p in state.params.items()}
    losses = faithfulness_warmup(run, model, state)
    assert len(losses) == 5 and losses[-1] < losses[0]
    for n, p in state.params.items():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == n.startswith("components."), n
    assert not state.opt_components.state and not state.opt_ci_fn.state  # training optimizers untouched


def test_next_token_ce():
    logits = _x(2 * 4 * 3, 1, 9).reshape(2, 4, 3)
    tok = torch.tensor([[0, 2, 1, 1], [2, 2, 0, 1]])
    expected = sum(-torch.log_softmax(logits[b, t], -1)[tok[b, t + 1]].item() for b in range(2) for t in range(3)) / 6
    assert float(next_token_ce(logits, tok)) == pytest.approx(expected, rel=1e-13)
