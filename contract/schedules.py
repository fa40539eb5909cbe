"""Schedules: pure functions of (step, total steps), evaluated on the host in float64 by
both backends and passed into the step (ALGORITHM §7). Spec S40, S41."""
from __future__ import annotations

import math

from contract.config import ImportanceMinimality, Schedule


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
