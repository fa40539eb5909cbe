"""Faithfulness, importance minimality and the output divergence
(SPEC S20-S24). Mirrors oracle_torch/losses.py."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from contract.resolve import ResolvedRun
from jax_impl.components import DecomposedModel


def faithfulness(run: ResolvedRun, model: DecomposedModel, frozen: dict, params: dict):
    """S21: sum_s ||W_s - V_s U_s||_F^2 / sum_s numel(W_s), from live V/U."""
    total, numel = 0.0, 0
    for s in run.sites:
        V, U = params[f"components.{s.name}.V"], params[f"components.{s.name}.U"]
        d = model.weight(frozen, s.name) - V @ U
        total = total + (d * d).sum()
        numel += d.size
    return total / numel


def importance_minimality(run: ResolvedRun, ci_upper: dict, p, beta: float, eps: float):
    """S22: per site s and component c, S_sc = sum over ALL positions of the global batch
    of (ci_upper + eps)^p; term = sum_s sum_c [S/N + beta (S/N) log2(1 + S)]."""
    total = 0.0
    for s in run.sites:
        u = ci_upper[s.name]
        S = ((u + eps) ** p).reshape(-1, s.C).sum(0)
        N = u.size // s.C
        total = total + (S / N + beta * (S / N) * jnp.log2(1 + S)).sum()
    return total


def output_divergence(kind: str, pred, target):
    """S23: 'kl' = mean over positions of KL(softmax(target) || softmax(pred));
    'mse' = sum (pred - target)^2 / numel. Computed in fp32 at least (bf16 compute, S70)."""
    pred = pred.astype(jnp.promote_types(pred.dtype, jnp.float32))
    target = target.astype(jnp.promote_types(target.dtype, jnp.float32))
    if kind == "kl":
        lt = jax.nn.log_softmax(target, -1)
        lp = jax.nn.log_softmax(pred, -1)
        return (jnp.exp(lt) * (lt - lp)).sum(-1).mean()
    if kind == "mse":
        return ((pred - target) ** 2).sum() / pred.size
    raise ValueError(f"output_loss: unknown {kind!r}")
