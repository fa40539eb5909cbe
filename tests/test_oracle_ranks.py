"""S108-S112: the oracle on N data ranks (FSDP2 over gloo) is the one-process oracle.

Every rank case (parity/ranks_invariance.py: one per target, persistent PGD with shared and
per-position sources, fresh PGD; 20 steps) runs on 1, 2 and 4 ranks, each world size in its
own subprocess, in float64 and float32: every world size equals world size 1 at step 0
(every loss term, every gradient leaf) and over the trajectory (every step's losses, every
leaf of the final state) within the `ranks_*` rows of parity/tolerances.py. The traps apply
one wrong reduction each (in the worker, never in the product code) and must be caught with
a first-divergence message."""
from __future__ import annotations

import pytest

from parity.ranks_invariance import RANK_CASES, TRAPS, compare, first_divergence, run_traps, run_world
from parity.tolerances import tol

# one xdist group with the rank CLI tests: at most 4 ranks on the machine at once; marked so it
# can run alone (`-m oracle_ranks`)
pytestmark = [pytest.mark.oracle_ranks, pytest.mark.xdist_group("oracle_ranks")]

NAMES = sorted(RANK_CASES)
PRECISIONS = ["float64", "float32"]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    d = tmp_path_factory.mktemp("ranks")
    return {w: run_world(NAMES, PRECISIONS, w, d / f"world{w}") for w in (1, 2, 4)}


def _check(ref: dict, got: dict, precision: str):
    return compare(ref, got, tol(precision, "ranks_step0").rel, tol(precision, "ranks_trajectory").rel)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", NAMES)
def test_world_size_changes_nothing(worlds, name, precision, world):
    worst = _check(worlds[1][(name, precision)], worlds[world][(name, precision)], precision)
    cells = ", ".join(f"{g} {w.err:.1e} ({w.where})" for g, w in worst.items())
    assert first_divergence(worst) is None, f"{name} {precision} on {world} ranks vs 1: {first_divergence(worst)}; {cells}"


def test_cases_see_what_they_claim():
    """The sharded paths are exercised: per-position (bsc) and shared persistent sources,
    fresh-PGD scopes bsc/c/bc, and batches that 4 ranks split."""
    from contract.config import FreshPGDTerm, PersistentPGDTerm
    from parity.ranks_invariance import case_run
    ppgd = case_run("ranks_tms_ppgd", "float64", 4).cfg
    assert {t.scope for t in ppgd.loss_terms if isinstance(t, PersistentPGDTerm)} == {"c", "nsc", "bsc"}
    fresh = case_run("ranks_fresh_pgd", "float64", 4).cfg
    assert {t.scope for t in fresh.loss_terms if isinstance(t, FreshPGDTerm)} == {"bsc", "c", "bc"}
    for n in NAMES:
        cfg = case_run(n, "float64", 4).cfg
        assert cfg.batch_size % 4 == 0 and cfg.steps == 20


def test_trajectories_move(worlds):
    """Nothing compared above is constant: every loss term changes over the steps and every
    gradient leaf at step 0 (parameters and sources) is non-zero somewhere (a constant term or
    a zero leaf would compare equal on any world size)."""
    import numpy as np
    for n in NAMES:
        r = worlds[1][(n, "float64")]
        const = [k for k in r["records"][0] if k.startswith("loss/") and len({m[k] for m in r["records"]}) == 1]
        assert not const, f"{n}: loss terms constant over the steps: {const}"
        zero = [g for g, v in r["grads0"].items() if not np.any(v)]
        assert not zero, f"{n}: gradient leaves identically zero at step 0: {zero}"


@pytest.fixture(scope="module")
def trapped(tmp_path_factory):
    """The persistent-PGD case on 2 ranks under each trap, one step (each shows at step 0)."""
    return run_traps("ranks_tms_ppgd", "float64", 2, tmp_path_factory.mktemp("traps"), list(TRAPS), steps=1)


@pytest.mark.parametrize("trap, where", [
    ("per_rank_log", "step 0 loss/1.importance_minimality"),  # the log of one rank's sums, not the global ones
    # FSDP2 summing N shares that are already whole gradients: the faithfulness warmup before
    # step 0 already takes doubled gradients, so step 0 starts from other parameters
    ("summed_grads", "step 0 loss/0.faithfulness"),
    ("per_rank_source", "step 0"),  # shared sources ascending on one rank's share of their gradient
])
def test_wrong_reduction_is_caught(worlds, trapped, trap, where):
    ref = worlds[1][("ranks_tms_ppgd", "float64")]
    ref_step0 = {"records": ref["records"][:1], "grads0": ref["grads0"], "final": {}}
    worst = _check(ref_step0, trapped[trap] | {"final": {}}, "float64")
    msg = first_divergence(worst)
    assert msg is not None, f"trap {trap} was not caught"
    assert msg.startswith(f"first divergence at {where}"), msg
