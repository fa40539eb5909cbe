"""The verdict of `python -m parity.float32_floor` (the four long runs themselves are too slow
for the suite; the closing note of issue #13 records a run): a mesh run passes when it is no
farther from the float64 run than FLOOR_FACTOR x the one-device float32 run is, metric by
metric, and runs that logged different steps are refused."""
from __future__ import annotations

import json

import pytest

from parity.float32_floor import FLOOR_FACTOR, deviations, main, read_metrics, verdict


def _runs(ref32: float, mesh32: float, proc32: float) -> dict:
    """(step, metric) tables: ref64 exact, the others off by the given relative error at step 20."""
    base = {(k, m): v for k in (10, 20) for m, v in (("loss/total", 2.0), ("l0/a", 8.0))}
    def off(e):
        return {key: v * (1 + e) if key == (20, "loss/total") else v for key, v in base.items()}
    return {"ref64": base, "ref32": off(ref32), "mesh32": off(mesh32), "proc32": off(proc32)}


def test_mesh_runs_within_the_float32_floor_pass():
    rows, ok = verdict(_runs(1e-3, 1.5e-3, 0.9e-3))
    assert ok and all(r["ok"] for r in rows)
    row = next(r for r in rows if r["metric"] == "loss/total")
    assert row["ref32"] == pytest.approx(1e-3, rel=1e-2) and row["mesh32"] == pytest.approx(1.5e-3, rel=1e-2)


def test_a_mesh_run_farther_from_float64_than_the_floor_fails_naming_the_metric():
    rows, ok = verdict(_runs(1e-3, 1e-3, 1.01 * FLOOR_FACTOR * 1e-3))
    assert not ok
    assert [r["metric"] for r in rows if not r["ok"]] == ["loss/total"]


def test_runs_that_logged_different_steps_are_refused():
    a = {(10, "loss/total"): 1.0, (20, "loss/total"): 1.0}
    with pytest.raises(ValueError, match=r"\(20, 'loss/total'\)"):
        deviations(a, {(10, "loss/total"): 1.0})


def test_reuse_reads_the_run_directories_and_writes_the_report(tmp_path, capsys):
    for name, e in (("ref64", 0.0), ("ref32", 1e-3), ("mesh32", 1e-3), ("proc32", 5e-3)):
        (tmp_path / name).mkdir()
        lines = [{"step": k, "loss/total": 2.0 * (1 + e * k / 20), "run": name} for k in (10, 20)]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert read_metrics(tmp_path / "ref32")[(20, "loss/total")] == pytest.approx(2.002)
    assert main(["--reuse", "--out", str(tmp_path), "--steps", "20"]) == 1  # proc32 is 5x ref32's error
    out = capsys.readouterr().out
    assert "loss/total" in out and "OVER" in out and "FAIL: 0 of 1" in out
    report = json.loads((tmp_path / "float32_floor.json").read_text())
    assert report["ok"] is False and (tmp_path / "float32_floor.png").stat().st_size > 0
