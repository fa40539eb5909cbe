"""The two performance scripts run and report numbers (they are tools, not timed tests:
nothing here asserts a speed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from contract.targets import REPO_ROOT


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
    env.pop("JAX_ENABLE_X64", None)
    return subprocess.run([sys.executable, *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600)


def test_benchmark_reports_both_backends(tmp_path):
    out = tmp_path / "bench.json"
    p = _run(["scripts/benchmark.py", "--configs", "tms_5-2", "--steps", "3", "--rounds", "2", "--warmup", "1",
              "--json", str(out)])
    assert p.returncode == 0, p.stderr[-2000:]
    (row,) = json.loads(out.read_text())
    assert row["config"] == "tms_5-2"
    assert row["jax"]["steps"] == 3 and row["oracle"]["steps"] == 3
    assert len(row["jax"]["seconds"]) == len(row["oracle"]["seconds"]) == len(row["ratio_per_round"]) == 2
    assert row["jax"]["steps_per_s"] == 3 / min(row["jax"]["seconds"]) and row["jax"]["compile_s"] > 0
    assert abs(row["ratio"] - row["jax"]["steps_per_s"] / row["oracle"]["steps_per_s"]) < 1e-9
    assert row["ratio_per_round"] == sorted(o / j for j, o in zip(row["jax"]["seconds"], row["oracle"]["seconds"], strict=True))
    assert all(abs(x) < 1e3 for x in (row["jax"]["loss"], row["oracle"]["loss"]))
    assert "tms_5-2" in p.stdout and "JAX/oracle" in p.stdout


def test_profile_step_prints_op_tables():
    p = _run(["scripts/profile_step.py", "tms_5-2", "--steps", "2", "--top", "3"])
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert lines[0].startswith("tms_5-2 (float32): wall ") and "ms/step" in lines[0]
    assert "op kind" in p.stdout and "slowest ops" in p.stdout
    # at least one timed op row under each table
    assert sum(1 for ln in lines if ln.strip() and ln.split()[0].replace(".", "").isdigit()) >= 3


def test_profile_step_names_a_missing_config():
    p = _run(["scripts/profile_step.py", "no_such_config"])
    assert p.returncode != 0 and "no_such_config" in p.stderr
