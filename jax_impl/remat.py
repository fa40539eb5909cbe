"""Rematerialised masked forwards (SPEC S144): `runtime.remat: <policy>` wraps every masked
forward of the training step (recon terms, PGD ascents and losses) in `jax.checkpoint` with
the named policy, so its intermediates are recomputed in the backward instead of held from
the forward to the backward. The values are the same program's; only what is stored
between the passes changes. `off` (the default) is the model itself."""
from __future__ import annotations

import jax

from jax_impl.components import DecomposedModel, SiteMode

POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,  # keep only the forward's inputs
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class RematModel(DecomposedModel):
    """The same model (its attributes shared, nothing reloaded) whose `masked_forward` is
    rematerialised under `policy`."""

    def __init__(self, model: DecomposedModel, policy: str):  # a view of `model`: no super().__init__ (nothing reloaded)
        if policy not in POLICIES:
            raise ValueError(f"runtime.remat: unknown policy {policy!r} (one of off, {', '.join(POLICIES)})")
        self.__dict__.update(model.__dict__)
        self.policy = policy

        def forward(frozen, params, batch, modes):  # SiteModes travel as (mask, delta_mask, route) tuples
            return DecomposedModel.masked_forward(self, frozen, params, batch,
                                                  {n: SiteMode(*m) for n, m in modes.items()})

        self._forward = jax.checkpoint(forward, policy=POLICIES[policy])

    def masked_forward(self, frozen, params, batch, modes: dict):
        return self._forward(frozen, params, batch, {n: (m.mask, m.delta_mask, m.route) for n, m in modes.items()})


def remat_model(model: DecomposedModel, policy: str):
    """The model the step runs: `model` itself when `policy` is "off"."""
    return model if policy == "off" else RematModel(model, policy)
