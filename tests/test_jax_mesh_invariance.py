"""Mesh invariance of the JAX trainer (SPEC S142, S143), marked `mesh_invariance` so it runs
alone (`pytest -m mesh_invariance`). One subprocess per device count (the count is fixed
before JAX starts) and one pair of processes for the 2-process run; the comparisons and the
exhaustive table are parity/mesh_invariance.py (`python -m parity.mesh_invariance
--exhaustive`). The default set: persistent PGD with a shared (c), a per-source (nsc) and a
per-position (bsc) scope on meshes (2,2), (1,4) and 2 processes x 2 devices, float64, 20
contract-draw steps and 5 production steps."""
from __future__ import annotations

import pytest

from parity import mesh_invariance as mi
from parity.tolerances import tol

pytestmark = [pytest.mark.mesh_invariance, pytest.mark.xdist_group("jax_mesh")]


def test_default_set_equals_one_device():
    d = mi.DEFAULT
    rows = mi.table(d["configs"], d["meshes"], d["dtypes"], d["processes"], steps=20, prod_steps=5)
    assert {r["mesh"] for r in rows} == {"(2,2)", "(1,4)", mi.TWO_PROCESSES}
    for r in rows:
        s0, tr = tol(r["dtype"], "mesh_step0").rel, tol(r["dtype"], "mesh_trajectory").rel
        where = f"{r['config']} on {r['mesh']} ({r['dtype']})"
        assert r["step0"] <= s0, f"{where}: step 0 rel {r['step0']:.1e} > {s0:.0e}"
        assert r["traj"] <= tr, f"{where}: 20 contract-draw steps rel {r['traj']:.1e} > {tr:.0e}"
        assert r["prod"] <= tr, f"{where}: 5 production steps rel {r['prod']:.1e} > {tr:.0e} (the generator, S143)"


def test_compare_sees_a_difference():
    # the comparison itself: one changed gradient entry and one changed metric are reported
    ref = {"terms": {"a": 1.0}, "grads": {"g": [3.0, 4.0]}, "traj": [{"x": 2.0}], "prod": [{"x": 1.0}]}
    got = {"terms": {"a": 1.0}, "grads": {"g": [3.0, 4.0 + 5e-9]}, "traj": [{"x": 2.0}], "prod": [{"x": 1.0 + 1e-6}]}
    out = mi.compare(ref, got)
    assert out["step0"] == pytest.approx(1e-9, rel=1e-3) and out["traj"] == 0.0
    assert out["prod"] == pytest.approx(1e-6, rel=1e-3)
