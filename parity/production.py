"""The production path under the gate (SPEC S150-S151): the helpers of
parity/test_production.py and of its mesh subprocess.

- `production_draws_at(backend, run, steps)`: what a backend's own production sampler draws
  for each step of `steps` of `run` (JAX: `jax_impl.train.sample_draws` keyed by `fold_in(prng_key(seed),
  step)`, laid out on the run's mesh; the oracle: `oracle_torch.train.draws_for_step`), as
  numpy arrays.
- `production_vs_parity(backend, run, precision, steps)`: runs the backend's production step
  (`train_step(..., draws=None)`, i.e. `step_with_key` in JAX) and its parity step fed those
  draws (`step_with_draws`) side by side from one initial state and reports every metric and
  every state leaf that differs (bit for bit: the two are the same function of the same
  numbers).
- `stream_problems(draws_by_step)`: statistical checks of a generator's draws: every named
  draw U[0,1) (a KS test), distinct names, distinct steps and distinct batch rows
  uncorrelated, and no value shared by two draws (a stream sliced from one call, a key reused
  across names or steps, a row broadcast over the batch all violate one of these)."""
from __future__ import annotations

import numpy as np

from contract.backend import FINITE
from contract.draws import draw_plan
from contract.init import init_state
from contract.resolve import ResolvedRun
from contract.runlog import with_dtype

FINITE_KEYS = (FINITE,)  # the production step's extra device flag (S106)


def production_draws_at(backend: str, run: ResolvedRun, steps, batch_shape=None) -> dict[int, dict[str, np.ndarray]]:
    """{step: the draws backend `backend` samples itself for that training step of `run`}
    (JAX: one compiled sampler for every step)."""
    plan = draw_plan(run, batch_shape)
    if backend == "torch":
        import torch

        from oracle_torch.train import draws_for_step
        dt = {"float64": torch.float64, "float32": torch.float32}[run.cfg.runtime.dtype]
        return {s: {k: v.numpy() for k, v in draws_for_step(run, s, dt, batch_shape).items()} for s in steps}
    import jax

    from jax_impl.mesh import Placement, make_mesh, mesh_shape
    from jax_impl.state import jax_dtype
    from jax_impl.train import prng_key, sample_draws
    dtype = jax_dtype(run.cfg.runtime.dtype)
    D, K = mesh_shape(run)
    shardings = None
    if D * K > 1:
        shardings = Placement(run, make_mesh(D, K)).draw_shardings(plan)
    sample = jax.jit(lambda k: sample_draws(plan, k, dtype, shardings))
    out = {}
    for s in steps:
        d = sample(jax.random.fold_in(prng_key(run.cfg.seed), s))
        out[s] = {k: np.asarray(jax.device_get(v)) for k, v in d.items()}
    return out


def production_vs_parity(backend: str, run: ResolvedRun, precision: str, steps: int, rel: float = 0.0) -> list[str]:
    """Differences between `steps` production steps and the same steps fed the production
    sampler's draws explicitly; [] when none. `rel` 0 = bit for bit (one device); on a mesh
    XLA partitions the two programs separately, so their sums may reassociate (`rel` from
    parity/tolerances.py's mesh rows)."""
    from contract.data import batch_for_step
    from loop.backends import make_backend

    run = with_dtype(run, precision)
    init = init_state(run)
    # one backend, two states: its production path (`train_step(..., None)`) and its parity
    # path (explicit draws) are separate functions of the backend (JAX: two jitted programs)
    be = make_backend(backend, run)
    sa, _ = be.faithfulness_warmup(be.new_state({k: v.copy() for k, v in init.items()}))
    sb, _ = be.faithfulness_warmup(be.new_state({k: v.copy() for k, v in init.items()}))
    draws = production_draws_at(backend, run, range(steps))
    problems: list[str] = []
    for k in range(steps):
        batch = batch_for_step(run, run.cfg.seed, k)
        sa, ma = be.train_step(sa, k, batch, None)
        sb, mb = be.train_step(sb, k, batch, draws[k])
        ma = {n: v for n, v in be.host_metrics(ma).items() if n not in FINITE_KEYS}
        mb = be.host_metrics(mb)
        if set(ma) != set(mb):
            problems.append(f"step {k}: metric names differ: only production {sorted(set(ma) - set(mb))}, "
                            f"only parity {sorted(set(mb) - set(ma))}")
        for n in sorted(set(ma) & set(mb)):
            if abs(ma[n] - mb[n]) > rel * max(abs(ma[n]), abs(mb[n])):
                problems.append(f"step {k}: {n}: production {ma[n]!r} != parity step on the production draws {mb[n]!r}")
    ea, eb = be.export_state(sa), be.export_state(sb)
    for n in sorted(set(ea) | set(eb)):
        if n not in ea or n not in eb:
            problems.append(f"final state: leaf {n} only in one of the two runs")
        else:
            a, b = np.asarray(ea[n], np.float64), np.asarray(eb[n], np.float64)
            d = float(np.max(np.abs(a - b))) if a.size else 0.0
            if a.shape != b.shape or d > rel * (float(np.linalg.norm(a.ravel())) if a.size else 0.0):
                problems.append(f"final state: leaf {n} differs (max abs {d:.3e}, relative to the leaf's norm)")
    be.close()
    return problems


# --------------------------------------------------------------------- statistics
KS_P_MIN = 1e-4  # per named draw at a fixed seed: a correct U[0,1) stream passes deterministically
CORR_SIGMAS = 6.0  # |Pearson r| bound in units of 1/sqrt(n) (the null's standard deviation)


def ks_uniform(x: np.ndarray) -> tuple[float, float]:
    """(statistic, p-value) of the one-sample KS test of `x` against U[0,1)."""
    from scipy.stats import kstest
    r = kstest(np.asarray(x, np.float64).ravel(), "uniform")
    return float(r.statistic), float(r.pvalue)  # pyright: ignore[reportAttributeAccessIssue]


def _corr(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    n = min(a.size, b.size)
    a, b = np.asarray(a, np.float64).ravel()[:n], np.asarray(b, np.float64).ravel()[:n]
    if n < 16 or a.std() == 0 or b.std() == 0:
        return (1.0 if n >= 16 else 0.0), n
    return float(np.corrcoef(a, b)[0, 1]), n


def stream_problems(draws_by_step: dict[int, dict[str, np.ndarray]], batched: set[str]) -> list[str]:
    """Statistical problems of a production stream's draws (see the module doc); [] if none.
    `batched`: names whose leading axis is the batch (their rows are checked pairwise)."""
    out: list[str] = []
    steps = sorted(draws_by_step)
    for s in steps:
        for n, x in draws_by_step[s].items():
            if x.min() < 0 or x.max() >= 1:
                out.append(f"step {s} {n}: values outside [0, 1) ({x.min()}, {x.max()})")
            if x.size >= 64:
                stat, p = ks_uniform(x)
                if p < KS_P_MIN:
                    out.append(f"step {s} {n}: not U[0,1) (KS statistic {stat:.3f}, p {p:.1e}, n {x.size})")
    s0 = draws_by_step[steps[0]]
    names = sorted(s0)
    for i, a in enumerate(names):  # distinct names, one step
        for b in names[i + 1:]:
            r, n = _corr(s0[a], s0[b])
            if n >= 16 and abs(r) > CORR_SIGMAS / np.sqrt(n):
                out.append(f"step {steps[0]}: draws {a} and {b} correlated (r {r:+.3f} over {n} values)")
    for s in steps[1:]:  # one name, distinct steps
        for n_ in names:
            r, n = _corr(s0[n_], draws_by_step[s][n_])
            if n >= 16 and abs(r) > CORR_SIGMAS / np.sqrt(n):
                out.append(f"draw {n_}: steps {steps[0]} and {s} correlated (r {r:+.3f} over {n} values)")
    for n_ in names:  # distinct batch rows, one draw
        x = s0[n_]
        if n_ in batched and x.shape[0] >= 2 and x[0].size >= 16:
            rows = x.reshape(x.shape[0], -1).astype(np.float64)
            r, n = _corr(rows[:-1].T.ravel(), rows[1:].T.ravel())  # row i against row i+1, pooled
            if abs(r) > CORR_SIGMAS / np.sqrt(n):
                out.append(f"draw {n_}: consecutive batch rows correlated (r {r:+.3f} over {n} values)")
        if n_ in batched and x.shape[0] >= 2:
            flat = x.reshape(x.shape[0], -1)
            if np.any(np.all(flat[1:] == flat[:1], axis=1)):
                out.append(f"draw {n_}: a batch row repeats row 0")
    # shared values: in float64 two independent uniforms coincide with probability ~2^-53, so
    # any value shared by two draws (or two steps) is a reused key, an overlapping slice of one
    # call or a broadcast
    vals = np.concatenate([np.asarray(x, np.float64).ravel() for s in steps for x in draws_by_step[s].values()])
    if all(x.dtype == np.float64 for s in steps for x in draws_by_step[s].values()):
        n_dup = vals.size - np.unique(vals).size
        if n_dup > 2:
            out.append(f"{n_dup} of {vals.size} drawn values repeat across names / steps / rows "
                       "(independent float64 uniforms essentially never coincide)")
    return out
