"""Schedules (contract/schedules.py) against hand-computed values of the formula in
SPEC S40 and the importance-minimality p annealing (S24, S41)."""
from __future__ import annotations

import math

import pytest

from contract.config import ImportanceMinimality, Schedule
from contract.schedules import imp_min_p, schedule_value


def sv(step, steps, **kw):
    return schedule_value(Schedule(**kw), step, steps)


approx = lambda x: pytest.approx(x, rel=1e-12, abs=1e-15)  # noqa: E731


def test_constant():
    # guards S40: constant = start at every step, with or without final_frac
    assert [sv(s, 7, start=0.3, final_frac=0.1) for s in range(7)] == [0.3] * 7


def test_linear_no_warmup():
    # guards S40: steps=11 -> pi = step/10; start*(f + (1-f)(1-pi)); last step = start*f
    kw = dict(start=2.0, final_frac=0.1, kind="linear")
    assert sv(0, 11, **kw) == approx(2.0)
    assert sv(5, 11, **kw) == approx(2.0 * (0.1 + 0.9 * 0.5))  # 1.1
    assert sv(8, 11, **kw) == approx(2.0 * (0.1 + 0.9 * 0.2))  # 0.56
    assert sv(10, 11, **kw) == approx(0.2)


def test_cosine_no_warmup():
    # guards S40: start*(f + (1-f)*0.5*(1+cos(pi*pi))) with pi = step/(steps-1)
    kw = dict(start=2.0, final_frac=0.0, kind="cosine")
    assert sv(0, 11, **kw) == approx(2.0)
    assert sv(5, 11, **kw) == approx(1.0)
    assert sv(10, 11, **kw) == approx(0.0)
    assert sv(2, 11, **kw) == approx(1.0 + math.cos(math.pi * 0.2))  # 1.809017
    kw["final_frac"] = 0.2
    assert sv(5, 11, **kw) == approx(2.0 * (0.2 + 0.8 * 0.5))  # 1.2
    assert sv(10, 11, **kw) == approx(0.4)


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_warmup(kind):
    # guards S40: steps=20, warmup_pct=0.25 -> w=5: step<5 ramps start*step/5 from 0;
    # then D=15, pi=(step-5)/14: step 5 -> start, step 12 -> pi=0.5, step 19 -> pi=1
    kw = dict(start=4.0, warmup_pct=0.25, final_frac=0.5, kind=kind)
    assert [sv(s, 20, **kw) for s in range(5)] == [approx(0.8 * s) for s in range(5)]
    assert sv(5, 20, **kw) == approx(4.0)
    mid = {"constant": 4.0, "linear": 4.0 * (0.5 + 0.5 * 0.5), "cosine": 4.0 * (0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi / 2)))}
    assert sv(12, 20, **kw) == approx(mid[kind])
    assert sv(19, 20, **kw) == approx(4.0 if kind == "constant" else 2.0)


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_short_decay_phase(kind):
    # guards S40's D <= 1 edge: no division by D-1 = 0; the value is start
    kw = dict(start=3.0, final_frac=0.0, kind=kind)
    assert sv(0, 1, **kw) == 3.0  # steps=1 -> D=1
    kw["warmup_pct"] = 0.9  # steps=10 -> w=9, D=1
    assert sv(4, 10, **kw) == approx(3.0 * 4 / 9)
    assert sv(9, 10, **kw) == 3.0
    kw["warmup_pct"] = 1.0  # w=steps, D=0: every step is warmup
    assert [sv(s, 4, **kw) for s in range(4)] == [approx(0.75 * s) for s in range(4)]


def test_two_steps_decay_reaches_final():
    # guards S40: D = 2 is the smallest decaying case (pi = 0 then 1)
    kw = dict(start=1.0, final_frac=0.25, kind="linear")
    assert (sv(0, 2, **kw), sv(1, 2, **kw)) == (approx(1.0), approx(0.25))


def imp(**kw):
    return ImportanceMinimality(type="importance_minimality", coeff=1.0, **kw)


def test_imp_min_p_no_anneal():
    # guards S24/S41: without p_anneal_final_p, p = pnorm throughout
    t = imp(pnorm=2.0, p_anneal_start_frac=0.0, p_anneal_end_frac=0.5)
    assert {imp_min_p(t, s, 100) for s in range(100)} == {2.0}


def test_imp_min_p_window_endpoints():
    # guards S24/S41: linear from pnorm to final_p over [start_frac, end_frac] of training,
    # constant outside; the endpoints take pnorm and final_p exactly
    t = imp(pnorm=2.0, p_anneal_start_frac=0.2, p_anneal_end_frac=0.6, p_anneal_final_p=1.0)
    assert imp_min_p(t, 0, 100) == 2.0
    assert imp_min_p(t, 19, 100) == 2.0
    assert imp_min_p(t, 20, 100) == 2.0  # window start
    assert imp_min_p(t, 30, 100) == approx(1.75)
    assert imp_min_p(t, 40, 100) == approx(1.5)
    assert imp_min_p(t, 60, 100) == 1.0  # window end
    assert imp_min_p(t, 99, 100) == 1.0


def test_imp_min_p_degenerate_window():
    # guards S24/S41: start_frac == end_frac is a step change (no division by zero)
    t = imp(pnorm=2.0, p_anneal_start_frac=0.5, p_anneal_end_frac=0.5, p_anneal_final_p=0.5)
    assert [imp_min_p(t, s, 10) for s in (4, 5, 6)] == [2.0, 2.0, 0.5]


def test_imp_min_p_default_window_never_anneals():
    # guards S24/S41 defaults: window [1, 1] -> p stays pnorm for every training step
    t = imp(pnorm=2.0, p_anneal_final_p=1.0)
    assert {imp_min_p(t, s, 10) for s in range(10)} == {2.0}
