"""Rematerialised masked forwards (SPEC S144): `runtime.remat: <policy>` runs every layer of
every masked forward of the training step (recon terms, PGD ascents and losses) -- a Llama
decoder layer, a ResidMLP block, the whole TMS model -- as a `jax.checkpoint` block with the
named policy: between the forward and the backward a masked forward keeps each layer's input
(the residual stream) and what the policy saves, and the backward recomputes one layer at a
time. The values are the same program's; only what is stored between the passes changes.
`off` (the default) is the model itself.

Measured on configs/llama_scaled.yaml (issue #13; TRANSITION "Rematerialisation"): the
residuals JAX saves from the forward to the backward of the step's loss are 604 MB plain,
477 MB with one checkpoint per live site (the earlier form: only the sites' own [N, C]
intermediates are recomputed) and 250 MB with one per layer (nothing_saveable). XLA's peak
of the compiled step (memory analysis) moves far less: 619 MiB plain, 619 MiB per site (the
same buffer plan), 598 MiB per layer; the step's process RSS growth 597 / 595 / 570 MB. So
the residuals of the masked forwards are not what sets the step's peak on this config."""
from __future__ import annotations

import jax

from jax_impl.components import DecomposedModel
from jax_impl.targets import target_forward

POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class RematModel(DecomposedModel):
    """The same model (its attributes shared, nothing reloaded) whose masked forwards run each
    layer as its own `jax.checkpoint` block under `policy`."""

    def __init__(self, model: DecomposedModel, policy: str):  # a view of `model`: no super().__init__ (nothing reloaded)
        if policy not in POLICIES:
            raise ValueError(f"runtime.remat: unknown policy {policy!r} (one of off, {', '.join(POLICIES)})")
        self.__dict__.update(model.__dict__)
        self.policy = policy

    def masked_forward(self, frozen, params, batch, modes: dict):
        policy = POLICIES[self.policy]
        return target_forward(self.kind, self.target_cfg, frozen, batch, self._site_fn(frozen, params, modes, None),
                              block=lambda f: jax.checkpoint(f, policy=policy))


def remat_model(model: DecomposedModel, policy: str):
    """The model the step runs: `model` itself when `policy` is "off"."""
    return model if policy == "off" else RematModel(model, policy)
