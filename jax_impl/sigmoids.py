"""The leaky-hard squashing pair (SPEC S10, S11). Mirrors
oracle_torch/sigmoids.py."""
from __future__ import annotations

import jax
import jax.numpy as jnp

ALPHA = 0.01


@jax.custom_vjp
def lower_leaky_hard(z):
    """Forward clamp(z, 0, 1). Backward (S10), upstream g:
    z <= 0: alpha*g where g < 0, else 0;  0 < z <= 1: g;  z > 1: 0."""
    return jnp.clip(z, 0.0, 1.0)


def _lower_fwd(z):
    return jnp.clip(z, 0.0, 1.0), z


def _lower_bwd(z, g):
    below = jnp.where(g < 0, ALPHA * g, jnp.zeros_like(g))
    return (jnp.where(z <= 0, below, jnp.where(z <= 1, g, jnp.zeros_like(g))),)


lower_leaky_hard.defvjp(_lower_fwd, _lower_bwd)


def upper_leaky_hard(z):
    """z > 1: 1 + alpha(z - 1); z < 0: 0; else z. Explicit `where`s: gradient 1 at the
    ties z = 0 and z = 1, as in the oracle (S11)."""
    return jnp.where(z > 1, 1 + ALPHA * (z - 1), jnp.where(z < 0, jnp.zeros_like(z), z))


def ci_pair(z, binomial_u):
    """(ci_lower, ci_upper); under binomial sampling ci_lower is of 1.05 z - 0.05 u (S12)."""
    zl = z if binomial_u is None else 1.05 * z - 0.05 * binomial_u
    return lower_leaky_hard(zl), upper_leaky_hard(z)
