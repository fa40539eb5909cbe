"""Adversaries in both backends (SPEC S80-S87): ascent direction, bounds, nsc rows, the
scan-vs-loop equivalence, and the final ascent at the pre-update parameters."""
from __future__ import annotations

import copy

import numpy as np

from contract.config import parse_config
from contract.data import batch_for_step
from contract.draws import draw_plan, sample_numpy
from contract.init import init_state
from contract.resolve import resolve_run
from tests.helpers import shipped_config

# ResidMLP: its residual output keeps every source gradient alive (TMS's ReLU output is
# dead on most sparse rows, where the adversary has nothing to push)
BASE = shipped_config("resid_mlp1")


def tms_run(terms, **over):
    d = copy.deepcopy(BASE)
    d.update({"batch_size": 16, "steps": 10, "faithfulness_warmup": {"steps": 20, "lr": 0.01},
              "sites": [{"pattern": "layers.*.mlp_in", "C": 6}, {"pattern": "layers.*.mlp_out", "C": 4}],
              "ci_fn": {"type": "mlp", "hidden": [4]},
              "loss_terms": [{"type": "faithfulness", "coeff": 1.0}, *terms]} | over)
    return resolve_run(parse_config(d))


PGD = {"type": "pgd_recon", "coeff": 1.0, "init": "random", "scope": "bsc", "n_steps": 4, "step_size": 0.05}


# ------------------------------------------------------------------ torch
def _torch_setup(run):
    import torch

    from oracle_torch.components import DecomposedModel
    from oracle_torch.state import make_state
    from oracle_torch.train import clean_and_ci, faithfulness_warmup
    torch.set_num_threads(1)
    state = make_state(run, init_state(run), torch.float64)
    model = DecomposedModel(run, state.params, torch.float64)
    faithfulness_warmup(run, model, state)
    batch = torch.as_tensor(batch_for_step(run, run.cfg.seed, 0), dtype=torch.float64)
    draws = {k: torch.as_tensor(v) for k, v in sample_numpy(draw_plan(run), run.cfg.seed, 0).items()}
    with torch.no_grad():
        clean, _, _, ci_lower, _ = clean_and_ci(run, model, state.params, batch, draws)
    return state, model, batch, draws, clean, ci_lower


def test_torch_sign_ascent_increases_loss_and_stays_in_bounds():
    # guards S80: each sign ascent raises the adversarial loss (small steps) and clamps to [0,1]
    from oracle_torch.adversary import sign_ascent, source_divergence
    from oracle_torch.context import StepContext
    run = tms_run([PGD])
    _, model, batch, draws, clean, ci = _torch_setup(run)
    ctx = StepContext(run=run, model=model, batch=batch, clean=clean)
    srcs = {n: draws[f"t1.e0.d0.{n}.pgd_init"] for n in run.site_names}
    losses = []
    for _ in range(4):
        losses.append(float(source_divergence(ctx, run.site_names, ci, srcs, None, "bsc")[0].detach()))
        srcs = sign_ascent(ctx, run.site_names, ci, srcs, None, "bsc", 0.02, 1)
        for s in srcs.values():
            assert float(s.min()) >= 0.0 and float(s.max()) <= 1.0
    print(losses)
    assert losses[-1] > losses[0] * 1.05, losses


def test_torch_nsc_rows_are_b_mod_n():
    # guards S83
    import torch

    from oracle_torch.adversary import expand_rows
    from oracle_torch.ranks import Ranks
    src = torch.arange(3.0)[:, None] * torch.ones(3, 2)
    rows = expand_rows(src, torch.arange(7), "nsc")
    assert rows[:, 0].tolist() == [b % 3 for b in range(7)]
    assert expand_rows(src[:1], torch.arange(7), "sc").shape == (1, 2)
    # S108: on rank 1 of 2 with 4 local rows the batch rows are 4..7 of the global batch
    assert expand_rows(src, Ranks(world=2, rank=1).row_ids(4), "nsc")[:, 0].tolist() == [b % 3 for b in range(4, 8)]


PPGD = {"type": "persistent_pgd_recon", "coeff": 0.7, "scope": "sc", "n_warmup": 1,
        "optimizer": {"type": "adam", "lr": {"start": 0.5}}}


def test_torch_final_ascent_uses_pre_update_parameters():
    # guards S84 (3): the recorded source gradient equals d(term)/d(src) at the PRE-update
    # params and differs from the one at the post-update params
    import torch

    from contract.backend import Probe
    from oracle_torch.adversary import persistent_pgd_term
    from oracle_torch.context import StepContext
    from oracle_torch.train import clean_and_ci, train_step
    run = tms_run([PPGD], optim={"components": {"lr": {"start": 0.05}}, "ci_fn": {"lr": {"start": 0.05}}})
    state, model, batch, draws, _, _ = _torch_setup(run)
    (t,) = run.recon_terms

    def src_grad():
        with torch.no_grad():
            clean, _, _, ci, _ = clean_and_ci(run, model, state.params, batch, draws)
        leaves = {n: s.detach().clone().requires_grad_(True) for n, s in state.sources[t.bundle].items()}
        v = persistent_pgd_term(StepContext(run=run, model=model, batch=batch, clean=clean), t, ci, leaves, draws)
        return dict(zip(leaves, torch.autograd.grad(v, list(leaves.values())), strict=True))

    # the step's warmup ascent runs first; replay it on a copy to know the leaves' values
    rec: dict = {}
    before = {n: p.detach().clone() for n, p in state.params.items()}
    src0 = {n: s.clone() for n, s in state.sources[t.bundle].items()}
    opt0 = copy.deepcopy(state.source_opt[t.bundle])
    train_step(run, model, state, batch, draws, Probe(rec))
    after = {n: p.detach().clone() for n, p in state.params.items()}
    # rebuild the post-warmup sources at the pre-update parameters
    from oracle_torch.adversary import persistent_warmup
    with torch.no_grad():
        for n, p in state.params.items():
            p.copy_(before[n])
        clean, _, _, ci, _ = clean_and_ci(run, model, state.params, batch, draws)
    state.sources[t.bundle], state.source_opt[t.bundle] = src0, opt0
    persistent_warmup(StepContext(run=run, model=model, batch=batch, clean=clean), t, ci,
                      state.sources[t.bundle], state.source_opt[t.bundle], 0.5)
    pre = src_grad()
    with torch.no_grad():
        for n, p in state.params.items():
            p.copy_(after[n])
    post = src_grad()
    for n in run.site_names:
        g = rec[f"grad.sources.{t.bundle}.{n}"]
        assert torch.allclose(g, pre[n], rtol=1e-12, atol=1e-15), n
        assert not torch.allclose(g, post[n], rtol=1e-6, atol=1e-9), n


# ------------------------------------------------------------------ JAX
def _jax_setup(run):
    import jax.numpy as jnp

    from jax_impl.components import DecomposedModel
    from jax_impl.state import make_state
    from jax_impl.train import clean_and_ci, faithfulness_warmup
    state = make_state(run, init_state(run), jnp.float32)
    model = DecomposedModel(run, jnp.float32)
    state = state.replace(params=faithfulness_warmup(run, model, state.params)[0])
    batch = jnp.asarray(batch_for_step(run, run.cfg.seed, 0), jnp.float32)
    draws = {k: jnp.asarray(v, jnp.float32) for k, v in sample_numpy(draw_plan(run), run.cfg.seed, 0).items()}
    clean, _, _, ci_lower, _ = clean_and_ci(run, model, model.frozen, state.params, batch, draws)
    return state, model, batch, draws, clean, ci_lower


def test_jax_scan_ascent_equals_python_loop_and_increases_loss():
    # guards S80: the lax.scan ascent is the plain loop; the loss rises; sources stay in [0,1]
    import jax

    from jax_impl.adversary import sign_ascent, source_divergence
    from jax_impl.context import StepContext
    run = tms_run([PGD])
    state, model, batch, draws, clean, ci = _jax_setup(run)
    ctx = StepContext(run=run, model=model, frozen=model.frozen, batch=batch, clean=clean)
    srcs = {n: draws[f"t1.e0.d0.{n}.pgd_init"] for n in run.site_names}
    args = (ctx, state.params, run.site_names, ci)
    a = jax.jit(lambda s: sign_ascent(*args, s, None, "bsc", 0.02, 4))(srcs)
    b = sign_ascent_python(*args, srcs, None, "bsc", 0.02, 4)
    for n in srcs:
        np.testing.assert_array_equal(np.asarray(a[n]), np.asarray(b[n]))
        assert float(a[n].min()) >= 0.0 and float(a[n].max()) <= 1.0
    d0 = float(source_divergence(*args, srcs, None, "bsc")[0])
    d1 = float(source_divergence(*args, a, None, "bsc")[0])
    assert d1 > d0


def sign_ascent_python(ctx, params, live, ci_det, srcs, routes, scope, step_size, n_steps):
    """The fresh-PGD ascent of jax_impl/adversary.py::sign_ascent as a plain Python loop
    (the reference for its lax.scan)."""
    import jax
    import jax.numpy as jnp

    from jax_impl.adversary import source_divergence
    params = jax.lax.stop_gradient(params)
    for _ in range(n_steps):
        grad = jax.grad(lambda s: source_divergence(ctx, params, live, ci_det, s, routes, scope)[0])(srcs)
        srcs = {n: jnp.clip(srcs[n] + step_size * jnp.sign(grad[n]), 0.0, 1.0) for n in srcs}
    return srcs


def test_jax_nsc_rows_are_b_mod_n():
    # guards S83
    import jax.numpy as jnp

    from jax_impl.adversary import expand_rows
    src = jnp.arange(3.0)[:, None] * jnp.ones((3, 2))
    assert np.asarray(expand_rows(src, 7, "nsc"))[:, 0].tolist() == [b % 3 for b in range(7)]


def test_jax_persistent_sources_stay_in_bounds_over_steps():
    # guards S84 (4): every ascent ends with a clamp, even with a huge source lr
    import jax.numpy as jnp

    from jax_impl.train import Stepper
    big = dict(PPGD, optimizer={"type": "sign", "lr": {"start": 5.0}}, scope="bsc")
    run = tms_run([big])
    state, model, batch, draws, _, _ = _jax_setup(run)
    st = Stepper(run, model, jnp.float32)
    for k in range(3):
        b = jnp.asarray(batch_for_step(run, run.cfg.seed, k), jnp.float32)
        state, _ = st.step_with_draws(state, b, sample_numpy(draw_plan(run), run.cfg.seed, k), k)
        for s in state.sources["t1"].values():
            assert float(s.min()) >= 0.0 and float(s.max()) <= 1.0
        assert any(float(s.min()) == 0.0 or float(s.max()) == 1.0 for s in state.sources["t1"].values())


def test_torch_eval_pgd_probe_is_adversarial():
    # guards S88: the probe's loss exceeds the loss at its initial sources, and it is logged
    import torch

    from contract.draws import eval_draw_plan
    from oracle_torch.adversary import source_divergence
    from oracle_torch.context import StepContext
    from oracle_torch.eval import eval_metrics
    run = tms_run([], eval={"every": 1, "batch_size": 16, "pgd_steps": 3, "pgd_step_size": 0.05})
    state, model, batch, _, clean, _ = _torch_setup(run)
    draws = {d.name: torch.rand(d.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
             for d in eval_draw_plan(run, tuple(batch.shape[:1]))}
    m = eval_metrics(run, model, state.params, batch, draws)
    from oracle_torch.eval import eval_ci
    with torch.no_grad():
        clean, ci = eval_ci(run, model, state.params, batch)
        d0, _ = source_divergence(StepContext(run=run, model=model, batch=batch, clean=clean), run.site_names, ci,
                                  {n: draws[f"eval.{n}.pgd_init"] for n in run.site_names}, None, "bsc")
    assert m["eval/pgd/mse"] > float(d0) * 1.05, (m["eval/pgd/mse"], float(d0))
