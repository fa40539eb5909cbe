"""Rematerialised masked forwards (SPEC S144): `runtime.remat: <policy>` runs every live site
of every masked forward of the training step (recon terms, PGD ascents and losses) as a
`jax.checkpoint` block with the named policy, so its intermediates are recomputed in the
backward instead of held from the forward to the backward. The values are the same program's; only what is stored
between the passes changes. `off` (the default) is the model itself."""
from __future__ import annotations

import jax

from jax_impl.components import DecomposedModel

POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,  # keep only the forward's inputs
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class RematModel(DecomposedModel):
    """The same model (its attributes shared, nothing reloaded) whose masked forwards run every
    live site as its own `jax.checkpoint` block under `policy`: the site's [N, C] intermediates
    (x·V, the masked activations) are recomputed one site at a time in the backward instead of
    held for every site from the forward on."""

    def __init__(self, model: DecomposedModel, policy: str):  # a view of `model`: no super().__init__ (nothing reloaded)
        if policy not in POLICIES:
            raise ValueError(f"runtime.remat: unknown policy {policy!r} (one of off, {', '.join(POLICIES)})")
        self.__dict__.update(model.__dict__)
        self.policy = policy

    def _site_fn(self, frozen, params, modes: dict, capture: dict | None):
        inner = DecomposedModel._site_fn(self, frozen, params, modes, capture)
        if capture is not None or not modes:  # the clean forward: nothing to rematerialise
            return inner
        policy = POLICIES[self.policy]

        def site(name, x):
            if name not in modes:
                return inner(name, x)
            return jax.checkpoint(lambda x: inner(name, x), policy=policy)(x)

        site.decomposed = getattr(inner, "decomposed", frozenset())
        return site


def remat_model(model: DecomposedModel, policy: str):
    """The model the step runs: `model` itself when `policy` is "off"."""
    return model if policy == "off" else RematModel(model, policy)
