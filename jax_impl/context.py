"""The frozen context of one step's math, mirroring oracle_torch/context.py: what every recon
and adversary function of a step reads and none of them changes.

A plain Python object, closed over by (or passed through) traced functions, never a jit
argument: while the step is traced its arrays are tracers of that trace."""
from __future__ import annotations

from dataclasses import dataclass

import jax

from contract.resolve import ResolvedRun
from jax_impl.components import DecomposedModel


@dataclass(frozen=True, eq=False)
class StepContext:
    """The run, the decomposed model, the frozen target weights (the oracle's model holds its
    own), one batch and its clean output (S7: every site frozen, stop-gradient). `frozen`,
    `batch` and `clean` are in the compute dtype (S70).

    The causal importances are not part of it: the ascents read them detached and the loss
    live (S80, S84 (1)), so every function takes them as an explicit `ci` argument."""
    run: ResolvedRun
    model: DecomposedModel
    frozen: dict
    batch: jax.Array
    clean: jax.Array

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """The batch's leading shape, (B,) or (B, T) (without a feature axis)."""
        return tuple(self.batch.shape[:len(self.run.batch_shape)])
