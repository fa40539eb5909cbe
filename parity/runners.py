"""Parity runners: build the initial state, the batches and every draw ONCE (numpy, keyed
by seed/step/name), feed the identical arrays to the torch oracle and to the JAX trainer,
and return per-step records (every loss term, total, per-leaf and per-group gradient
norms, parameter norms, CI L0 per site, schedule values) plus step-0 gradients.

JAX float64 needs `jax_enable_x64` set before JAX starts: parity/conftest.py and the CLIs
set it; float32 runs pass explicit float32 arrays so the flag does not change them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from contract.data import batch_for_step
from contract.draws import draw_plan, sample_numpy
from contract.init import init_state
from contract.resolve import ResolvedRun


@dataclass
class Inputs:
    """Everything both backends consume, identical by construction."""
    run: ResolvedRun
    precision: str
    init: dict[str, np.ndarray]
    batches: list[np.ndarray]
    draws: list[dict[str, np.ndarray]]


def make_inputs(run: ResolvedRun, precision: str, n_steps: int) -> Inputs:
    seed = run.cfg.seed
    plan = draw_plan(run)
    return Inputs(run, precision, init_state(run),
                  [batch_for_step(run, seed, k) for k in range(n_steps)],
                  [sample_numpy(plan, seed, k) for k in range(n_steps)])


def _np(x) -> float:
    return float(np.asarray(x))


def run_oracle(inp: Inputs, grads_at_step0: bool = True):
    """-> (records per step, {leaf: step-0 grad ndarray}, warmup losses)."""
    import torch

    from oracle_torch.components import DecomposedModel
    from oracle_torch.train import faithfulness_warmup, make_state, torch_dtype, train_step

    torch.set_num_threads(1)
    dt = torch_dtype(inp.precision)
    state = make_state(inp.run, inp.init, dt)
    model = DecomposedModel(inp.run, state.params, dt)
    warm = faithfulness_warmup(inp.run, model, state.params)
    records, grads0 = [], {}
    for k, (b, d) in enumerate(zip(inp.batches, inp.draws)):
        batch = torch.as_tensor(b) if b.dtype.kind == "i" else torch.as_tensor(b, dtype=dt)
        draws = {n: torch.as_tensor(a, dtype=dt) for n, a in d.items()}
        rec = {} if (k == 0 and grads_at_step0) else None
        records.append(train_step(inp.run, model, state, batch, draws, rec))
        if rec is not None:
            grads0 = {n[5:]: v.numpy() for n, v in rec.items() if n.startswith("grad.")}
    return records, grads0, warm


def run_jax(inp: Inputs, grads_at_step0: bool = True):
    """-> (records per step, {leaf: step-0 grad ndarray}, warmup losses)."""
    import jax.numpy as jnp

    from jax_impl.components import DecomposedModel
    from jax_impl.train import Stepper, faithfulness_warmup, jax_dtype, make_state

    dt = jax_dtype(inp.precision)
    model = DecomposedModel(inp.run, dt)
    state = make_state(inp.run, inp.init, dt)
    params, warm = faithfulness_warmup(inp.run, model, state["params"])
    state["params"] = params
    stepper = Stepper(inp.run, model, dt)
    records, grads0 = [], {}
    for k, (b, d) in enumerate(zip(inp.batches, inp.draws)):
        batch = jnp.asarray(b) if b.dtype.kind == "i" else jnp.asarray(b, dt)
        if k == 0 and grads_at_step0:
            state, m, g = stepper.step_with_draws(state, batch, d, k, with_grads=True)
            grads0 = {n: np.asarray(v) for n, v in g.items()}
        else:
            state, m = stepper.step_with_draws(state, batch, d, k)
        records.append({n: _np(v) for n, v in m.items()})
    return records, grads0, warm
