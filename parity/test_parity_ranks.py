"""`pytest parity/` on the sharded oracle (S112): the FSDP2 oracle on 2 data ranks against the
committed goldens (made by the one-process oracle), with the parity gate's own tolerances.
The Llama trajectory and the persistent-PGD trajectory (shared c / nsc and per-position bsc
sources) run in one 2-rank subprocess; the one-process oracle is checked against the same
goldens by test_parity.py, and 1 vs 2 vs 4 ranks against each other by
tests/test_oracle_ranks.py."""
from __future__ import annotations

import pytest

from parity.goldens import compare_result, load_golden, provenance_note
from parity.ranks_invariance import run_world

NAMES = ["traj_llama.64", "traj_tms_ppgd.64"]
pytestmark = pytest.mark.xdist_group("oracle_ranks_parity")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_world(NAMES, ["float64"], 2, tmp_path_factory.mktemp("two_ranks"), steps=50)


@pytest.mark.parametrize("name", NAMES)
def test_oracle_on_two_ranks_vs_golden(two_ranks, name, record_property):
    g = load_golden(name)
    r = two_ranks[(name, "float64")]
    assert len(r["records"]) == len(g.trajectory) == 50
    rep = compare_result(f"{name} oracle-2-ranks-vs-golden", "float64", (r["records"], r["grads0"], r["warmup"]),
                         (g.trajectory, g.grads, g.terms["warmup"]))
    cells = [f"{what} {e:.1e}/{a:.0e}" for what, (e, a, _) in rep.worst.items()]
    record_property("margins", f"{rep.label:40s} " + "  ".join(cells))
    assert rep.ok, rep.message(provenance_note(g))
