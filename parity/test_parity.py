"""`pytest parity/`: the gate. For every case: JAX vs the oracle's goldens, the oracle vs
its goldens, and JAX vs the oracle live (all three fed identical state, draws, batches).
Fail closed on keys; failures name the first diverging step, term and tensor."""
from __future__ import annotations

import pytest

from contract.config import config_diff
from parity.cases import CASES
from parity.goldens import compare_result, load_golden, provenance_note
from parity.lock import lock_problem
from parity.runners import run_jax, run_oracle

_cache: dict = {}


def _result(backend: str, name: str):
    key = (backend, name)
    if key not in _cache:
        case = CASES[name]
        inp = _cache.setdefault(("inputs", name), case.inputs())
        _cache[key] = (run_oracle if backend == "oracle" else run_jax)(inp)
    return _cache[key]


def _golden(name: str):
    g = load_golden(name)
    cfg = CASES[name].cfg()
    if g.manifest["config_hash"] != cfg.hash():
        diff = "\n".join(config_diff(g.manifest["config"], cfg.to_dict()))
        pytest.fail(f"golden {name} is stale: it was made for another config (regenerate with "
                    f"`python -m parity.regen --reason ... --cases {name}`):\n{diff}")
    if g.manifest.get("init_edit", "") != CASES[name].init_edit:  # S154: an edited initial state
        pytest.fail(f"golden {name} is stale: made with init_edit {g.manifest.get('init_edit', '')!r}, the case has "
                    f"{CASES[name].init_edit!r} (regenerate with `python -m parity.regen --reason ... --cases {name}`)")
    return g, (g.trajectory, g.grads, g.terms["warmup"])


def _check(rep, record_property, extra=""):
    cells = [f"{what} {e:.1e}/{a:.0e}" for what, (e, a, _) in rep.worst.items()]
    record_property("margins", f"{rep.label:40s} " + "  ".join(cells))
    assert rep.ok, rep.message(extra)


def test_oracle_is_locked():
    """S90: the oracle changes only through the sanctioned, logged regeneration."""
    problem = lock_problem()
    assert problem is None, problem


CASE_PARAMS = [pytest.param(n, marks=pytest.mark.xdist_group(n)) for n in CASES]


@pytest.mark.parametrize("name", CASE_PARAMS)
def test_jax_vs_golden(name, record_property):
    g, want = _golden(name)
    rep = compare_result(f"{name} jax-vs-golden", CASES[name].precision, _result("jax", name), want)
    _check(rep, record_property, provenance_note(g))


@pytest.mark.parametrize("name", CASE_PARAMS)
def test_oracle_vs_golden(name, record_property):
    g, want = _golden(name)
    rep = compare_result(f"{name} oracle-vs-golden", CASES[name].precision, _result("oracle", name), want)
    _check(rep, record_property, provenance_note(g))


@pytest.mark.parametrize("name", CASE_PARAMS)
def test_jax_vs_oracle_live(name, record_property):
    rep = compare_result(f"{name} jax-vs-oracle", CASES[name].precision, _result("jax", name), _result("oracle", name))
    _check(rep, record_property)


def test_goldens_cover_every_case():
    """Fail closed: every case has a golden folder and every golden folder is a case."""
    from parity.goldens import GOLDENS
    on_disk = {p.name for p in GOLDENS.iterdir() if p.is_dir()}
    assert on_disk == set(CASES), f"golden folders without a case: {sorted(on_disk - set(CASES))}; cases without goldens: {sorted(set(CASES) - on_disk)}"
