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


def make_inputs(run: ResolvedRun, precision: str, n_steps: int, init: dict[str, np.ndarray] | None = None) -> Inputs:
    """`init`: the initial state (default contract/init.py's; a case's own: `Case.inputs`)."""
    seed = run.cfg.seed
    plan = draw_plan(run)
    return Inputs(run, precision, init_state(run) if init is None else init,
                  [batch_for_step(run, seed, k) for k in range(n_steps)],
                  [sample_numpy(plan, seed, k) for k in range(n_steps)])


def run_backend(name: str, inp: Inputs, grads_at_step0: bool = True):
    """Run backend `name` ("torch" | "jax") on `inp` through the backend interface.
    -> (records per step, {leaf: step-0 grad ndarray}, warmup losses)."""
    from contract.backend import Probe
    from contract.runlog import with_dtype
    from loop.backends import make_backend

    if name == "torch":
        import torch
        torch.set_num_threads(1)
    backend = make_backend(name, with_dtype(inp.run, inp.precision))
    state, warm = backend.faithfulness_warmup(backend.new_state(inp.init))
    records, grads0 = [], {}
    for k, (b, d) in enumerate(zip(inp.batches, inp.draws, strict=True)):
        record: dict | None = {} if (k == 0 and grads_at_step0) else None
        state, m = backend.train_step(state, k, b, d, None if record is None else Probe(record))
        records.append(backend.host_metrics(m))
        if record is not None:
            grads0 = {n[5:]: v for n, v in record.items() if n.startswith("grad.")}
    return records, grads0, warm


def run_oracle(inp: Inputs, grads_at_step0: bool = True):
    return run_backend("torch", inp, grads_at_step0)


def run_jax(inp: Inputs, grads_at_step0: bool = True):
    return run_backend("jax", inp, grads_at_step0)
