"""The frozen context of one step's math, mirrored by jax_impl/context.py: what every recon
and adversary function of a step reads and none of them changes."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from contract.resolve import ResolvedRun
from oracle_torch.components import DecomposedModel
from oracle_torch.losses import output_divergence
from oracle_torch.ranks import ONE, Ranks


@dataclass(frozen=True, eq=False)
class StepContext:
    """The run, the decomposed model (it holds the frozen target and the live parameters),
    one batch and its clean output (S7: every site frozen, no gradient), and the data ranks
    (on N ranks the batch is this rank's rows of the global batch, S108).

    The causal importances are not part of it: the ascents read them detached and the loss
    live (S80, S84 (1)), so every function takes them as an explicit `ci` argument."""
    run: ResolvedRun
    model: DecomposedModel
    batch: torch.Tensor
    clean: torch.Tensor
    ranks: Ranks = ONE

    def divergence(self, out: torch.Tensor) -> torch.Tensor:
        """S23: the output divergence of a masked forward from the clean output, over the global batch."""
        return output_divergence(self.run.cfg.output_loss, out, self.clean, self.ranks)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """The batch's leading shape, (B,) or (B, T) (without a feature axis)."""
        return tuple(self.batch.shape[:len(self.run.batch_shape)])
