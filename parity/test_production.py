"""The production path under the gate (SPEC S150-S151). Parity feeds explicit draws through
the parity step; production samples its own. These tests pin that the production step IS
the parity step fed the production sampler's draws (same schedule values, same result, bit
for bit in float64 and float32), in both backends, on one device (the mesh: tests/test_production_mesh.py), and
that both production generators are sound: every named draw U[0,1), distinct names, steps
and batch rows uncorrelated, no value shared between draws."""
from __future__ import annotations

import numpy as np
import pytest

from contract.draws import draw_plan
from parity.cases import CASES
from parity.production import production_draws_at, production_vs_parity, stream_problems
from parity.tolerances import tol

# (case, precision, steps): a trajectory case with warmup/cosine/linear schedules, p annealing
# and persistent sources (steps 0-2 sit in the lr warmup, so a production step fed another
# step's schedule differs), and float32 with routed (subset, chunks) forwards in one case
# (traj_tms.32 and resid2_chunks in float64 were separate cases: merged for the time budget)
PROD_CASES = [("traj_tms_ppgd.64", "float64", 3), ("resid2_chunks", "float32", 2)]


@pytest.mark.parametrize("backend", ["jax", "torch"])
@pytest.mark.parametrize("name,precision,steps", PROD_CASES)
def test_production_step_is_the_parity_step(backend, name, precision, steps):
    # guards S150: bit for bit in the oracle; JAX within its production row (two XLA programs)
    rel = tol(precision, "production_jax").rel if backend == "jax" else 0.0
    problems = production_vs_parity(backend, CASES[name].run(), precision, steps, rel)
    assert not problems, f"{backend} {name}: the production step is not the parity step on its own draws:\n" + \
        "\n".join(problems[:20])


STAT_CASES = [("tms_all_terms", (512,)), ("tms_binomial_nodelta", (512,)), ("llama_kl", (64, 8))]


def _stream(backend: str, name: str, batch_shape) -> tuple[dict, set]:
    from contract.runlog import with_dtype
    run = with_dtype(CASES[name].run(), "float64")
    plan = draw_plan(run, batch_shape)
    return (production_draws_at(backend, run, (0, 1, 7), batch_shape),
            {d.name for d in plan if d.batched})


@pytest.mark.parametrize("backend", ["jax", "torch"])
@pytest.mark.parametrize("name,batch_shape", STAT_CASES)
def test_production_stream_is_uniform_and_independent(backend, name, batch_shape):
    # guards S151
    draws, batched = _stream(backend, name, batch_shape)
    assert len(draws[0]) >= 4
    problems = stream_problems(draws, batched)
    assert not problems, f"{backend} production stream of {name}:\n" + "\n".join(problems[:20])


def _bad(kind: str, draws: dict[int, dict[str, np.ndarray]]) -> dict[int, dict[str, np.ndarray]]:
    """Streams with the bugs a port makes, built from a sound one."""
    rng = np.random.default_rng(0)
    out = {}
    for s, d in draws.items():
        total = sum(x.size for x in d.values())
        flat = rng.random(total + 8) if kind != "step_unkeyed" else np.random.default_rng(1).random(total + 8)
        o, i = {}, 0
        for n, x in d.items():
            if kind == "overlap":  # each draw sliced from one call at offset = its index, not its size
                o[n] = flat[i:i + x.size].reshape(x.shape)
                i += 1
            elif kind == "same_key":
                o[n] = np.random.default_rng(5).random(x.shape)
            elif kind == "row_broadcast":
                o[n] = np.broadcast_to(rng.random(x.shape[1:]), x.shape).copy()
            elif kind == "step_unkeyed":  # sliced properly, but the same for every step
                o[n] = flat[i:i + x.size].reshape(x.shape)
                i += x.size
            elif kind == "skewed":
                o[n] = rng.random(x.shape) ** 1.3
        out[s] = o
    return out


@pytest.mark.parametrize("kind", ["overlap", "same_key", "row_broadcast", "step_unkeyed", "skewed"])
def test_stream_checks_catch_broken_generators(kind):
    draws, batched = _stream("torch", "tms_all_terms", (512,))
    assert not stream_problems(draws, batched)
    assert stream_problems(_bad(kind, draws), batched), f"a {kind} stream passed the statistical checks"
