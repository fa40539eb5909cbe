"""Faithfulness, importance minimality and the output divergence
(SPEC S20-S24)."""
from __future__ import annotations

import torch

from contract.resolve import ResolvedRun
from oracle_torch.components import DecomposedModel
from oracle_torch.ranks import ONE, Ranks


def summed(total: torch.Tensor | float, what: str) -> torch.Tensor:
    """The result of a `0.0 + t_1 + ... + t_n` accumulation of tensors, unchanged: a float
    means nothing was added (n = 0), which no resolved run produces."""
    if not isinstance(total, torch.Tensor):
        raise ValueError(f"{what}: nothing to sum (no tensor was accumulated)")
    return total


def faithfulness(run: ResolvedRun, model: DecomposedModel, params: dict) -> torch.Tensor:
    """S21: sum_s ||W_s - V_s U_s||_F^2 / sum_s numel(W_s), from live V/U."""
    total: torch.Tensor | float = 0.0
    numel = 0
    for s in run.sites:
        V, U = params[f"components.{s.name}.V"], params[f"components.{s.name}.U"]
        d = model.weight(s.name) - V @ U
        total = total + (d * d).sum()
        numel += d.numel()
    return summed(total, "faithfulness: run.sites") / numel


def importance_minimality(run: ResolvedRun, ci_upper: dict, p: float, beta: float, eps: float,
                          ranks: Ranks = ONE) -> torch.Tensor:
    """S22: per site s and component c, S_sc = sum over ALL positions of the global batch
    of (ci_upper + eps)^p; term = sum_s sum_c [S/N + beta (S/N) log2(1 + S)]. The log is
    taken of the global sum (never per shard: the ranks' sums are all-reduced first, S109),
    sites are never merged."""
    total: torch.Tensor | float = 0.0
    for s in run.sites:
        u = ci_upper[s.name]
        S = ranks.sum(((u + eps) ** p).reshape(-1, s.C).sum(0))
        N = u.numel() // s.C * ranks.world
        total = total + (S / N + beta * (S / N) * torch.log2(1 + S)).sum()
    return summed(total, "importance_minimality: run.sites")


def output_divergence(kind: str, pred: torch.Tensor, target: torch.Tensor, ranks: Ranks = ONE) -> torch.Tensor:
    """S23: 'kl' = mean over positions of KL(softmax(target) || softmax(pred));
    'mse' = sum (pred - target)^2 / numel; positions and numel of the global batch (S109)."""
    if kind == "kl":
        lt = torch.log_softmax(target, -1)
        lp = torch.log_softmax(pred, -1)
        return ranks.mean((lt.exp() * (lt - lp)).sum(-1))
    if kind == "mse":
        return ranks.sum(((pred - target) ** 2).sum()) / (pred.numel() * ranks.world)
    raise ValueError(f"output_loss: unknown {kind!r}")


