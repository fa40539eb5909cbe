"""Schedules: pure functions of (step, total steps), evaluated on the host in float64 by
both backends and passed into the step. Spec S40, S41."""
from __future__ import annotations

import math

from contract.adversary import bundle_of
from contract.config import ImportanceMinimality, PersistentPGDTerm, RunConfig, Schedule


def schedule_value(s: Schedule, step: int, steps: int) -> float:
    w = int(steps * s.warmup_pct)
    if step < w:
        return s.start * step / w
    D = steps - w
    if D <= 1 or s.kind == "constant":
        return s.start
    frac = (step - w) / (D - 1)
    f = s.final_frac
    if s.kind == "linear":
        return s.start * (f + (1 - f) * (1 - frac))
    if s.kind == "cosine":
        return s.start * (f + (1 - f) * 0.5 * (1 + math.cos(math.pi * frac)))
    raise ValueError(f"unknown schedule kind {s.kind!r}")


def imp_min_p(t: ImportanceMinimality, step: int, steps: int) -> float:
    """p anneals linearly from pnorm to p_anneal_final_p over the training-fraction
    window [start_frac, end_frac]; constant outside it (S41)."""
    if t.p_anneal_final_p is None:
        return t.pnorm
    frac = step / steps
    a, b = t.p_anneal_start_frac, t.p_anneal_end_frac
    if frac <= a:
        return t.pnorm
    if frac >= b:
        return t.p_anneal_final_p
    return t.pnorm + (t.p_anneal_final_p - t.pnorm) * (frac - a) / (b - a)


def hparams(cfg: RunConfig, step: int) -> dict[str, float]:
    """Every schedule value of training step `step`, computed on the host and passed into the
    step by both backends (S40, S41; the source LR once per training step, S84)."""
    hp = {"lr_components": schedule_value(cfg.optim.components.lr, step, cfg.steps),
          "lr_ci_fn": schedule_value(cfg.optim.ci_fn.lr, step, cfg.steps)}
    for i, t in enumerate(cfg.loss_terms):
        if t.type == "importance_minimality":
            hp["imp_min_p"] = imp_min_p(t, step, cfg.steps)
        if isinstance(t, PersistentPGDTerm):  # persistent_pgd_recon, persistent_pgd_recon_subset
            hp[f"lr_sources.{bundle_of(i, t)}"] = schedule_value(t.optimizer.lr, step, cfg.steps)
    return hp
