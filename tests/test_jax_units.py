"""Unit tests of the JAX trainer's building blocks, each against a hand computation. Mirrors
tests/test_oracle_units.py test for test; every test cites the SPEC.md invariant it guards.

Precision: JAX float64 needs the process-global `jax_enable_x64`, which the parity suite turns
on for the whole pytest session while `pytest tests/` alone leaves it off. These tests pass
explicit float32 arrays everywhere, so they run identically in both modes; hand computations
are in float64 numpy and tolerances are float32-sized.
"""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contract.config import parse_config
from contract.draws import eval_draw_plan, route_from_uniforms as route_ref
from contract.resolve import ResolvedRun, resolve_run
from jax_impl.components import DecomposedModel, SiteMode
from jax_impl.eval import (
    EVAL_VARIANTS,
    eval_ci,
    eval_key,
    eval_metrics,
    next_token_ce,
    sample_eval_draws,
)
from jax_impl.losses import faithfulness, importance_minimality, output_divergence
from jax_impl.recon import route_from_uniforms
from jax_impl.sigmoids import ALPHA, ci_pair, lower_leaky_hard, upper_leaky_hard
from jax_impl.state import make_state
from jax_impl.targets import frozen_site
from jax_impl.train import clip_grad_norm, faithfulness_warmup
from tests.helpers import tms_config, write_tiny_tms

F32 = jnp.float32
REL = 1e-5  # float32 against float64 hand computations


# ---------------------------------------------------------------- fixtures
@pytest.fixture
def tms(tmp_path):
    run = resolve_run(parse_config(tms_config(write_tiny_tms(tmp_path))))
    state = make_state(run, None, F32)
    model = DecomposedModel(run, F32)
    return run, state, model


def _u(shape, seed=0) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).random(shape), F32)


def _x(n=6, f=5, seed=0):
    return _u((n, f), seed)


def _eq(a, b) -> bool:
    """Bitwise equality of two arrays (same dtype, same bytes)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ---------------------------------------------------------------- S10 / S11 / S12
def test_lower_leaky_backward_every_regime_and_tie():
    # S10: z <= 0 -> alpha*g only where g < 0; 0 < z <= 1 -> g; z > 1 -> 0. Ties z=0 (first
    # regime) and z=1 (second regime), both gradient signs; custom_vjp backward.
    z = jnp.asarray([-2.0, 0.0, 0.3, 1.0, 1.5], F32)
    for sign in (+1.0, -1.0):
        g = jnp.full((5,), 0.7 * sign, F32)
        out, vjp = jax.vjp(lower_leaky_hard, z)
        assert _eq(out, jnp.asarray([0.0, 0.0, 0.3, 1.0, 1.0], F32))
        (gz,) = vjp(g)
        g0 = np.float32(0.7 * sign)
        below = np.float32(ALPHA) * g0 if sign < 0 else np.float32(0.0)
        assert _eq(gz, np.asarray([below, below, g0, g0, 0.0], np.float32))
    # the tie z=0 with g<0 passes alpha*g (not g), z=1 passes g (not 0)
    _, vjp = jax.vjp(lower_leaky_hard, jnp.asarray([0.0, 1.0], F32))
    (gz,) = vjp(jnp.asarray([-1.0, -1.0], F32))
    assert np.asarray(gz).tolist() == [np.float32(-ALPHA), -1.0]
    # and under jit (the production path) the same backward
    gj = jax.jit(jax.grad(lambda z: (lower_leaky_hard(z) * jnp.asarray([-1.0, -1.0], F32)).sum()))(jnp.asarray([0.0, 1.0], F32))
    assert np.asarray(gj).tolist() == [np.float32(-ALPHA), -1.0]


def test_upper_leaky_values_and_gradients_with_ties():
    # S11: z > 1 -> 1 + alpha(z-1); z < 0 -> 0; else z; derivative 1 at both ties z=0, z=1.
    z = jnp.asarray([-2.0, 0.0, 0.3, 1.0, 1.5], F32)
    out, vjp = jax.vjp(upper_leaky_hard, z)
    assert np.asarray(out) == pytest.approx([0.0, 0.0, 0.3, 1.0, 1.0 + ALPHA * 0.5], rel=1e-7)
    for g in (1.0, -2.0):
        (gz,) = vjp(jnp.full((5,), g, F32))
        assert np.asarray(gz) == pytest.approx([0.0, g, g, g, ALPHA * g], rel=1e-7)


def test_binomial_ci_pair():
    # S12: ci_lower = lower(1.05 z - 0.05 u); ci_upper = upper(z), independent of u.
    z = jnp.asarray([-0.1, 0.02, 0.5, 0.97, 1.2], F32)
    u = jnp.asarray([0.3, 0.9, 0.1, 0.2, 0.5], F32)
    lo, up = ci_pair(z, u)
    assert _eq(lo, jnp.clip(1.05 * z - 0.05 * u, 0, 1))
    assert _eq(up, upper_leaky_hard(z))
    gz = jax.grad(lambda z: ci_pair(z, u)[0].sum())(z)
    # 1.05 z - 0.05 u: [-0.12, -0.024, 0.52, 1.0085, 1.235] -> regimes 0, 0, pass, 0, 0
    assert np.asarray(gz) == pytest.approx([0.0, 0.0, 1.05, 0.0, 0.0], rel=1e-6)


# ---------------------------------------------------------------- S21 / S22 / S23
def test_importance_minimality_hand_computation_two_sites_different_C():
    # S22: S_sc = sum over all positions of (ci_upper + eps)^p; term = sum_s sum_c
    # [S/N + beta (S/N) log2(1 + S)], sites never merged, N = #positions. beta > 0, p != 1.
    g = np.random.default_rng(3)
    cu64 = {"a": 1.2 * g.random((2, 3, 3)),   # [B, T, C=3], N = 6
            "b": 1.2 * g.random((2, 3, 2))}   # C = 2
    cu = {k: jnp.asarray(v, F32) for k, v in cu64.items()}
    # a stand-in run with only the field importance_minimality reads
    run = cast(ResolvedRun, SimpleNamespace(sites=[SimpleNamespace(name="a", C=3), SimpleNamespace(name="b", C=2)]))
    p, beta, eps = 1.7, 0.4, 1e-3
    expected = 0.0
    for name, C in (("a", 3), ("b", 2)):
        vals = np.asarray(cu[name], np.float64).reshape(-1, C).tolist()
        N = len(vals)
        for c in range(C):
            S = sum((row[c] + eps) ** p for row in vals)
            expected += S / N + beta * (S / N) * math.log2(1 + S)
    got = importance_minimality(run, cu, p, beta, eps)
    assert float(got) == pytest.approx(expected, rel=REL)
    # the log takes the GLOBAL sum: the mean of two half-batch values (a per-shard log) differs
    half = importance_minimality(run, {k: v[:1] for k, v in cu.items()}, p, beta, eps)
    half2 = importance_minimality(run, {k: v[1:] for k, v in cu.items()}, p, beta, eps)
    assert abs(float(half + half2) / 2 - expected) > 1e-3


def test_kl_direction_and_per_position_mean():
    # S23: kl = mean over positions of KL(softmax(clean) || softmax(masked)).
    clean = np.array([[[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [1.0, 3.0, 0.5]],
                      [[-2.0, 1.0, 4.0], [0.3, -0.3, 0.0], [5.0, 0.0, 0.0]]])
    masked = np.array([[[0.0, 1.0, 0.0], [3.0, -1.0, 0.0], [1.0, 0.0, 2.0]],
                       [[0.0, 0.0, 0.0], [2.0, 2.0, -2.0], [0.0, 1.0, 0.0]]])

    def kl(p_logits, q_logits):
        p = [math.exp(v) for v in p_logits]
        q = [math.exp(v) for v in q_logits]
        zp, zq = sum(p), sum(q)
        return sum(pi / zp * math.log((pi / zp) / (qi / zq)) for pi, qi in zip(p, q, strict=True))

    pos = [(b, t) for b in range(2) for t in range(3)]
    fwd = sum(kl(clean[b, t].tolist(), masked[b, t].tolist()) for b, t in pos) / len(pos)
    rev = sum(kl(masked[b, t].tolist(), clean[b, t].tolist()) for b, t in pos) / len(pos)
    got = float(output_divergence("kl", jnp.asarray(masked, F32), jnp.asarray(clean, F32)))
    assert got == pytest.approx(fwd, rel=REL)
    assert abs(fwd - rev) > 1e-2  # the directions differ, so the test tells them apart
    # per-position MEAN, not sum over positions and not a batchmean over B only
    assert abs(got - fwd * len(pos)) > 1e-2 and abs(got - fwd * 3) > 1e-2


def test_mse_is_sum_over_numel():
    # S23: mse = sum (pred - target)^2 / numel
    a, b = _x(4, 3, 1), _x(4, 3, 2)
    ref = ((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).sum() / 12
    assert float(output_divergence("mse", a, b)) == pytest.approx(ref, rel=REL)


def test_faithfulness_normalised_over_all_sites():
    # S21: sum_s ||W_s - V_s U_s||^2 / sum_s numel(W_s) over sites of different shapes,
    # not a mean of per-site means.
    g = np.random.default_rng(5)
    W = {"a": g.standard_normal((3, 4)), "b": g.standard_normal((5, 2))}
    P = {"components.a.V": g.standard_normal((3, 2)), "components.a.U": g.standard_normal((2, 4)),
         "components.b.V": g.standard_normal((5, 3)), "components.b.U": g.standard_normal((3, 2))}
    Wj = {k: jnp.asarray(v, F32) for k, v in W.items()}
    Pj = {k: jnp.asarray(v, F32) for k, v in P.items()}
    # stand-ins with only the fields faithfulness reads
    run = cast(ResolvedRun, SimpleNamespace(sites=[SimpleNamespace(name="a"), SimpleNamespace(name="b")]))
    model = cast(DecomposedModel, SimpleNamespace(weight=lambda frozen, n: frozen[n]))
    sq = {n: float(((W[n] - P[f"components.{n}.V"] @ P[f"components.{n}.U"]) ** 2).sum()) for n in W}
    expected = (sq["a"] + sq["b"]) / (12 + 10)
    assert float(faithfulness(run, model, Wj, Pj)) == pytest.approx(expected, rel=REL)
    assert abs(expected - (sq["a"] / 12 + sq["b"] / 10) / 2) > 1e-3


# ---------------------------------------------------------------- S5 / S6
def test_non_live_site_gets_no_component_gradient_and_runs_frozen_path(tms):
    # S5: only linear1 live -> linear2 runs x.W + b exactly and its V/U gradient is exactly 0.
    run, state, model = tms
    x = _x()
    mask, dm = _u((6, 4), 1), _u((6,), 2)
    params = state.params

    def loss(p):
        return model.masked_forward(model.frozen, p, x, {"linear1": SiteMode(mask, dm, None)}).sum()

    g = jax.jit(jax.grad(loss))(params)
    assert not np.any(np.asarray(g["components.linear2.V"])) and not np.any(np.asarray(g["components.linear2.U"]))
    assert np.abs(np.asarray(g["components.linear1.V"])).sum() > 0 and np.abs(np.asarray(g["components.linear1.U"])).sum() > 0
    # only linear2 live: linear1 (non-live) output, i.e. linear2's input, is the frozen path bit for bit
    cap: dict = {}
    site = model._site_fn(model.frozen, params, {"linear2": SiteMode(_u((6, 3), 3), None, None)}, cap)
    h = site("linear1", x)
    assert _eq(h, x @ model.frozen["linear1.weight"])
    assert _eq(h, frozen_site(model.frozen, model.modules["linear1"], x))
    # and no [..., C] tensor for the non-live site: its hook returns the d_out-wide frozen output
    assert h.shape == (6, 2)


def test_routed_out_positions_equal_frozen_output_bitwise(tms):
    # S6: positions with route False take the frozen output of the same input, bit for bit.
    run, state, model = tms
    params = state.params
    x = _x()
    route = jnp.asarray([True, False, True, False, False, True])
    r = np.asarray(route)
    mask, dm = _u((6, 4), 4), _u((6,), 5)
    fz = model.frozen

    def site_out(mode):
        return model._site_fn(fz, params, {} if mode is None else {"linear1": mode}, None)("linear1", x)

    y = site_out(SiteMode(mask, dm, route))
    dec = site_out(SiteMode(mask, dm, None))
    frozen = site_out(None)
    assert _eq(np.asarray(y)[~r], np.asarray(frozen)[~r])
    assert _eq(np.asarray(y)[r], np.asarray(dec)[r]) and not _eq(np.asarray(y)[r], np.asarray(frozen)[r])
    # whole model, both sites routed out at the same positions -> the clean output there (also jitted)
    clean, _ = model.clean_forward(fz, x)
    modes = {"linear1": SiteMode(_u((6, 4), 6), _u((6,), 7), route),
             "linear2": SiteMode(_u((6, 3), 8), _u((6,), 9), route)}
    out = jax.jit(lambda p, x: model.masked_forward(fz, p, x, modes))(params, x)
    assert _eq(np.asarray(out)[~r], np.asarray(clean)[~r])


# ---------------------------------------------------------------- S51
def test_routing_rule_equals_contract_reference():
    # S51: k = min(1 + floor(u n), n); site i routes iff #{j: order_j < order_i} < k.
    # The JAX rule must equal contract.draws.route_from_uniforms element for element.
    g = np.random.default_rng(11)
    rule = jax.jit(route_from_uniforms)
    for n in (1, 2, 5):
        rk = g.random((7, 4)).astype(np.float32)  # float32 uniforms, as production draws them
        ro = g.random((7, 4, n)).astype(np.float32)
        rk[0, 0], rk[0, 1] = 0.0, np.nextafter(np.float32(1), np.float32(0))  # k = 1 and k = n at the ends of [0, 1)
        if n > 1:
            ro[1, 0, :] = 0.5  # ties: nobody is strictly below -> everyone routes
        want = route_ref(rk, ro)
        got = np.asarray(rule(jnp.asarray(rk, F32), jnp.asarray(ro, F32)))
        assert got.dtype == bool and got.shape == want.shape
        assert np.array_equal(got, want), n
        if n > 1:
            assert got[1, 0].all()
    # uniform_k never routes zero sites and routes exactly k sites without ties
    rk, ro = g.random(1000).astype(np.float32), g.random((1000, 4)).astype(np.float32)
    routed = np.asarray(rule(jnp.asarray(rk, F32), jnp.asarray(ro, F32))).sum(-1)
    assert routed.min() >= 1 and np.array_equal(routed, np.minimum(1 + np.floor(rk * 4), 4))


# ---------------------------------------------------------------- S43 / S44
@pytest.mark.parametrize("max_norm", [0.05, 1e6, None])
def test_clip_grad_norm_semantics(max_norm):
    # S43: per group, torch's clip_grad_norm_: total = ||(||g_i||)_i||, scale
    # min(max/(total + 1e-6), 1) applied to every gradient; no clip when unset.
    g = np.random.default_rng(7)
    grads64 = {n: g.standard_normal(s) for n, s in (("a", (3, 4)), ("b", (5,)), ("c", (2, 2, 2)))}
    grads = {n: jnp.asarray(v, F32) for n, v in grads64.items()}
    clipped, total = clip_grad_norm(grads, max_norm)
    ref_total = math.sqrt(sum(float((np.asarray(v, np.float64) ** 2).sum()) for v in grads.values()))
    assert float(total) == pytest.approx(ref_total, rel=REL)
    scale = 1.0 if max_norm is None else min(max_norm / (ref_total + 1e-6), 1.0)
    for n in grads:
        np.testing.assert_allclose(np.asarray(clipped[n]), np.asarray(grads[n], np.float64) * scale, rtol=2e-6, atol=0)
    if max_norm is None or max_norm == 1e6:  # no clip / clamped to 1: gradients untouched bit for bit
        assert all(_eq(clipped[n], grads[n]) for n in grads)
    if max_norm == 0.05:
        after = math.sqrt(sum(float((np.asarray(v, np.float64) ** 2).sum()) for v in clipped.values()))
        assert after == pytest.approx(0.05, rel=1e-4)
    # the +1e-6 sits outside the norm: a tiny max_norm shows it (max / (total + 1e-6))
    tiny = {"a": jnp.asarray([3e-6, 4e-6], F32)}  # total 5e-6
    c2, _ = clip_grad_norm(tiny, 1e-6)
    np.testing.assert_allclose(np.asarray(c2["a"]), np.array([3e-6, 4e-6]) * (1e-6 / 6e-6), rtol=1e-5)


def test_faithfulness_warmup_only_touches_components(tmp_path):
    # S44: AdamW on faithfulness alone, V/U only; the training optimizers are untouched.
    run = resolve_run(parse_config(tms_config(write_tiny_tms(tmp_path), faithfulness_warmup={"steps": 5, "lr": 1e-2})))
    state = make_state(run, None, F32)
    model = DecomposedModel(run, F32)
    before = {n: np.asarray(p) for n, p in state.params.items()}
    params, losses = faithfulness_warmup(run, model, state.params)
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert set(params) == set(before)
    for n, p in params.items():
        changed = not _eq(p, before[n])
        assert changed == n.startswith("components."), n
        assert p.dtype == F32
    assert int(state.opt_components.inner_state[0].count) == 0  # training optimizers untouched


# ---------------------------------------------------------------- eval (S13, S26)
def test_eval_metrics_toy_variants(tms):
    # S13/S26: eval masks use ci_lower; ci/unmasked/rounded/zero have no delta path;
    # stochastic uses the named eval draws. Mirrors the oracle's eval test.
    run, state, model = tms
    params, fz = state.params, model.frozen
    x = _x(8, 5, 3)
    plan = eval_draw_plan(run, (8,))
    assert [d.name for d in plan] == ["eval.linear1.source", "eval.linear1.delta", "eval.linear2.source", "eval.linear2.delta"]
    draws = {d.name: _u(d.shape, 20 + i) for i, d in enumerate(plan)}
    m = {k: float(v) for k, v in eval_metrics(run, model, fz, params, x, draws).items()}
    assert set(m) == {"eval/l0/linear1", "eval/l0/linear2"} | {f"eval/mse/{v}" for v in EVAL_VARIANTS}

    @jax.jit
    def reference(params, x, draws):
        clean, ci = eval_ci(run, model, fz, params, x)
        pred = model.masked_forward(fz, params, x, {n: SiteMode(c, None, None) for n, c in ci.items()})
        stoch = model.masked_forward(fz, params, x, {n: SiteMode(c + (1 - c) * draws[f"eval.{n}.source"],
                                                                 draws[f"eval.{n}.delta"], None) for n, c in ci.items()})
        unm = model.masked_forward(fz, params, x, {n: SiteMode(jnp.ones_like(c), None, None) for n, c in ci.items()})
        return clean, ci, pred, stoch, unm

    clean, ci, pred, stoch, unm = reference(params, x, draws)

    def mse(a):
        return float(((np.asarray(a, np.float64) - np.asarray(clean, np.float64)) ** 2).mean())

    assert m["eval/mse/ci"] == pytest.approx(mse(pred), rel=REL)
    assert m["eval/mse/stochastic"] == pytest.approx(mse(stoch), rel=REL)
    # zero masks, no delta: linear1 outputs 0, linear2 outputs its bias -> relu(b)
    b = np.asarray(fz["linear2.bias"], np.float64)
    assert m["eval/mse/zero"] == pytest.approx(mse(np.broadcast_to(np.maximum(b, 0), (8, 5))), rel=REL)
    # unmasked (mask 1, no delta) = the V.U forward
    assert m["eval/mse/unmasked"] == pytest.approx(mse(unm), rel=REL)
    assert m["eval/l0/linear1"] == pytest.approx(float((np.asarray(ci["linear1"]) > 0).sum(-1).mean()), rel=1e-7)
    # production eval draws: the plan sampled from eval_key(seed, step, j), U[0, 1), per-name shapes
    prod = jax.jit(lambda k: sample_eval_draws(plan, k, F32))(eval_key(0, 3, 1))
    assert {k: v.shape for k, v in prod.items()} == {d.name: d.shape for d in plan}
    assert all(v.dtype == F32 and 0 <= float(v.min()) and float(v.max()) < 1 for v in prod.values())


def test_next_token_ce():
    logits = _u((2, 4, 3), 9) * 3
    tok = jnp.asarray([[0, 2, 1, 1], [2, 2, 0, 1]])
    lg = np.asarray(logits, np.float64)

    def logsm(v):
        return v - np.log(np.exp(v).sum())

    expected = sum(-logsm(lg[b, t])[int(tok[b, t + 1])] for b in range(2) for t in range(3)) / 6
    assert float(next_token_ce(logits, tok)) == pytest.approx(expected, rel=REL)


def test_stacked_forwards_equal_one_forward_each(monkeypatch):
    # S28b: stacking same-shape forwards (at most MAX_STACK a call) changes no term and no
    # gradient beyond reassociation; tms_all_terms has every plain plan x source and two
    # draws per stochastic entry, so stacks of 4 (stochastic) and 2 (CI-masked/unmasked) form
    import jax_impl.recon as recon
    from contract.draws import draw_plan
    from contract.schedules import hparams
    from jax_impl.train import forward_terms, prng_key, sample_draws
    from parity.cases import CASES

    run = resolve_run(parse_config(CASES["tms_all_terms"].config_dict()))
    model = DecomposedModel(run, F32)
    params = make_state(run, None, F32).params
    batch = jnp.asarray(np.random.default_rng(0).uniform(size=run.batch_shape + (5,)), F32)
    draws = sample_draws(draw_plan(run), jax.random.fold_in(prng_key(0), 3), F32)
    hp = {k: jnp.asarray(v, F32) for k, v in hparams(run.cfg, 0).items()}
    calls = []
    real = model.masked_forward

    def counting(frozen, p, b, modes):
        calls.append(b.shape[0])
        return real(frozen, p, b, modes)

    monkeypatch.setattr(model, "masked_forward", counting)

    def terms_and_grads(max_stack):
        monkeypatch.setattr(recon, "MAX_STACK", max_stack)
        calls.clear()
        f = lambda p: forward_terms(run, model, model.frozen, p, batch, draws, hp)
        (total, (terms, _)), g = jax.value_and_grad(f, has_aux=True)(params)
        return terms, g, list(calls)

    t1, g1, c1 = terms_and_grads(1)
    t4, g4, c4 = terms_and_grads(4)
    B = run.batch_shape[0]
    assert max(c1) == B and max(c4) == 4 * B and len(c4) < len(c1)  # stacks really formed
    for k in t1:
        assert float(t4[k]) == pytest.approx(float(t1[k]), rel=1e-6, abs=1e-9), k
    for k in g1:
        np.testing.assert_allclose(np.asarray(g4[k]), np.asarray(g1[k]), rtol=1e-4, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("config", ["tiny_llama", "shapes"])
def test_grouped_draws_are_each_draws_own_call(config):
    # S143: the step and the eval draw a group of alike draws with one generator call;
    # draw i must still be exactly uniform(fold_in(key, i), shape), the stream every checkpoint names
    from contract.draws import DrawSpec, draw_plan
    from contract.runlog import load_run
    from jax_impl.eval import sample_eval_draws
    from jax_impl.train import prng_key, sample_draws

    if config == "shapes":  # alike draws apart in the plan, and a one-draw group
        plan = [DrawSpec(n, s) for n, s in [("a", (3, 5)), ("b", (7,)), ("c", (3, 5)), ("d", (2, 3, 4)), ("e", (7,))]]
    else:
        plan = draw_plan(load_run(str(Path(__file__).resolve().parents[1] / "configs/tiny_llama.yaml"), dtype="float32"))
    assert len({d.shape for d in plan}) < len(plan)  # groups really form
    key = jax.random.fold_in(prng_key(0), 3)
    for sample in (sample_draws, sample_eval_draws):
        got = jax.jit(lambda k, sample=sample: sample(plan, k, F32))(key)
        assert sorted(got) == sorted(d.name for d in plan)
        for i, d in enumerate(plan):
            want = jax.random.uniform(jax.random.fold_in(key, i), d.shape, F32)
            assert np.array_equal(np.asarray(got[d.name]), np.asarray(want)), (sample.__name__, d.name)
