"""The case matrix checks what it claims: every number-changing config field off its default
in some case (SPEC S152, parity/coverage.py) and no degenerate case (S153,
parity/degeneracy.py: every term depends on its draws and parameters, no gradient group
identically zero)."""
from __future__ import annotations

import json

import pytest

from parity.cases import CASES
from parity.coverage import coverage_problems
from parity.degeneracy import degeneracy_problems, zero_gradient_groups
from parity.goldens import GOLDENS


def _trajectories(names) -> dict[str, list[dict]]:
    out = {}
    for n in names:
        p = GOLDENS / n / "trajectory.json"
        if p.exists():
            out[n] = json.loads(p.read_text())
    return out


def test_every_number_changing_field_is_covered():
    # guards S152
    problems = coverage_problems(CASES, _trajectories(CASES))
    assert not problems, "the parity cases leave config fields unchecked:\n" + "\n".join(problems)


@pytest.mark.parametrize("drop", ["traj_hparams.64", "tms_binomial_nodelta", "llama_transformer", "resid2_chunks"])
def test_coverage_fails_without_a_case(drop):
    # the coverage check has teeth: each of these cases is the only carrier of some field
    cases = {n: c for n, c in CASES.items() if n != drop}
    assert coverage_problems(cases, _trajectories(cases)), f"removing {drop} left the coverage unchanged"


# trajectory cases: step 0 is checked once per target (the .32 twin shares its config)
DEGENERACY_CASES = [n for n in CASES if not n.endswith(".32")]


@pytest.mark.parametrize("name", DEGENERACY_CASES)
def test_case_is_not_degenerate(name):
    # guards S153
    problems = degeneracy_problems(CASES[name].run(), CASES[name].init())
    assert not problems, f"case {name} is degenerate (re-pin its seed / data / CI so its terms depend on masks " \
        f"and sources):\n" + "\n".join(problems)


@pytest.mark.parametrize("name", [n for n in CASES if CASES[n].steps > 1])
def test_no_gradient_group_is_zero_over_the_trajectory(name):
    # guards S153: a source bundle (or parameter group) that never moves checks nothing
    p = GOLDENS / name / "trajectory.json"
    assert p.exists(), f"golden {name} is missing"
    problems = zero_gradient_groups(json.loads(p.read_text()))
    assert not problems, f"{name}: " + "; ".join(problems)


def test_degeneracy_check_catches_a_constant_term():
    # the pre-S153 pin of tms_binomial_nodelta (seed 0, the target's sparse features): the TMS
    # output is identically zero after its final ReLU, so both recon terms are constants
    d = CASES["tms_binomial_nodelta"].config_dict()
    d["seed"], d["data"] = 0, {}
    from contract.config import parse_config
    from contract.resolve import resolve_run
    problems = degeneracy_problems(resolve_run(parse_config(d)))
    assert any("stochastic_recon" in p and "resampled" in p for p in problems), problems
    assert zero_gradient_groups([{"grad_norm/sources.t3.linear1": 0.0, "grad_norm/components": 1.0}] * 3) == \
        ["gradient of sources.t3 is exactly zero at all 3 steps"]


def test_ties_case_hits_both_ties_at_every_position():
    # guards S154: tms_ties' CI logits are exactly 0 (component 0) and exactly 1 (component 1)
    # of every site at every position of step 0, after the faithfulness warmup, and the other
    # components are off the ties
    import numpy as np

    from contract.backend import Probe
    from contract.data import batch_for_step
    from contract.draws import draw_plan, sample_numpy
    from loop.backends import make_backend
    case = CASES["tms_ties"]
    run = case.run()
    be = make_backend("torch", run)
    state, _ = be.faithfulness_warmup(be.new_state(case.init(run)))
    rec: dict = {}
    be.forward_terms(state, 0, batch_for_step(run, run.cfg.seed, 0), sample_numpy(draw_plan(run), run.cfg.seed, 0),
                     Probe(rec))
    for s in run.sites:
        z = np.asarray(rec[f"ci_logits.{s.name}"]).reshape(-1, s.C)
        assert np.all(z[:, 0] == 0.0) and np.all(z[:, 1] == 1.0), (s.name, z[:, :2])
        assert np.all((z[:, 2:] != 0.0) & (z[:, 2:] != 1.0)), s.name
