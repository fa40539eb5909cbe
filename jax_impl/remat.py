"""Rematerialised masked forwards (SPEC S144): `runtime.remat: <policy>` runs every layer of
every masked forward of the training step (recon terms, PGD ascents and losses) -- a Llama
decoder layer, a ResidMLP block, the whole TMS model -- as a `jax.checkpoint` block with the
named policy: between the forward and the backward a masked forward keeps each layer's input
(the residual stream) and what the policy saves, and the backward recomputes one layer at a
time. The values are the same program's; only what is stored between the passes changes.
`off` (the default) is the model itself.

Measured on configs/llama_scaled.yaml (issue #13; TRANSITION "Rematerialisation"): what JAX
keeps from the forward to the backward of the step's loss is 604 MB plain, 477 MB with one
checkpoint per live site (the earlier form) and 250 MB with one per layer. XLA's peak of the
compiled step (memory analysis) is 619 MiB plain, 619 MiB per site, 598 MiB per layer under
XLA:CPU's default scheduler, and 422 MiB per layer under its memory-minimizing scheduler, which
remat therefore turns on (`use_memory_scheduler`); the step's RSS growth 597 -> 390 MB."""
from __future__ import annotations

import os

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


MEMORY_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def use_memory_scheduler(policy: str) -> bool:
    """Under remat, ask XLA:CPU for its memory-minimizing scheduler (process-wide, through
    XLA_FLAGS, before XLA reads its flags: in `launch.join`, which `make_backend` runs first). Its default, the
    concurrency-optimized scheduler, trades memory for parallelism and runs the recomputation
    early, so the checkpoints barely move the peak: the llama_scaled step's XLA temp is 553.6
    MiB plain, 532.1 MiB with remat under the default scheduler and 355.9 MiB with remat under
    the memory scheduler (the same option through `jax.jit(compiler_options=)` left it at 532.1).
    False (nothing set) when remat is off or the flag is already given."""
    if policy == "off":
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_enable_concurrency_optimized_scheduler" in flags:
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {MEMORY_SCHEDULER}".strip()
    return True


def remat_model(model: DecomposedModel, policy: str):
    """The model the step runs: `model` itself when `policy` is "off"."""
    return model if policy == "off" else RematModel(model, policy)
