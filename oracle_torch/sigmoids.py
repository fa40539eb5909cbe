"""The leaky-hard squashing pair (SPEC S10, S11)."""
from __future__ import annotations

import torch

ALPHA = 0.01


class LowerLeakyHard(torch.autograd.Function):
    """Forward clamp(z, 0, 1). Backward (S10), upstream g:
    z <= 0: alpha*g where g < 0, else 0;  0 < z <= 1: g;  z > 1: 0."""

    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return z.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        below = torch.where(g < 0, ALPHA * g, torch.zeros_like(g))
        return torch.where(z <= 0, below, torch.where(z <= 1, g, torch.zeros_like(g)))


def lower_leaky_hard(z: torch.Tensor) -> torch.Tensor:
    return LowerLeakyHard.apply(z)


def upper_leaky_hard(z: torch.Tensor) -> torch.Tensor:
    """z > 1: 1 + alpha(z - 1); z < 0: 0; else z. Written with explicit `where`s so the
    gradient at the ties z = 0 and z = 1 is 1 in both frameworks (S11)."""
    return torch.where(z > 1, 1 + ALPHA * (z - 1), torch.where(z < 0, torch.zeros_like(z), z))


def ci_pair(z: torch.Tensor, binomial_u: torch.Tensor | None):
    """(ci_lower, ci_upper) of logits z. Under binomial sampling ci_lower is taken of
    1.05 z - 0.05 u (S12)."""
    zl = z if binomial_u is None else 1.05 * z - 0.05 * binomial_u
    return lower_leaky_hard(zl), upper_leaky_hard(z)
