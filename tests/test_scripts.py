"""The two performance scripts run and report numbers (they are tools, not timed tests:
nothing here asserts a speed)."""
from __future__ import annotations

import importlib.util
import json
import math
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
    p = _run(["scripts/benchmark.py", "--configs", "tms_5-2", "--steps", "2", "--rounds", "1", "--warmup", "0",
              "--sweep", "none", "--json", str(out)])
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(out.read_text())
    assert set(got) == {"peak_flops", "configs"} and set(got["configs"]) == {"tms_5-2"}
    assert math.isfinite(got["peak_flops"]) and got["peak_flops"] > 1e8  # a real GEMM rate, not a placeholder
    keys = {"steps_per_s", "model_flops_per_step", "mfu", "compile_s", "peak_rss_mb"}
    row = got["configs"]["tms_5-2"]
    assert set(row) == {"jax", "oracle"}
    for who in ("jax", "oracle"):
        assert set(row[who]) == keys, who
        assert all(math.isfinite(v) and v > 0 for v in row[who].values()), (who, row[who])
        # MFU is achieved / peak: the fields agree with each other
        achieved = row[who]["model_flops_per_step"] * row[who]["steps_per_s"]
        assert abs(row[who]["mfu"] - achieved / got["peak_flops"]) < 1e-12 and row[who]["mfu"] < 1
    assert row["jax"]["model_flops_per_step"] == row["oracle"]["model_flops_per_step"]
    assert "tms_5-2" in p.stdout and "MFU" in p.stdout and "XLA dots" in p.stdout


def test_benchmark_sweep_configs_scale_one_knob():
    spec = importlib.util.spec_from_file_location("benchmark", REPO_ROOT / "scripts" / "benchmark.py")
    assert spec is not None and spec.loader is not None
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    d = benchmark.config_dict("tiny_llama", 10)
    sites = [(s.name, s.C) for s in benchmark.resolve(d, "tiny_llama").sites]
    c2 = benchmark.resolve(benchmark.sweep_config(d, "C", 2.0, sites), "x")
    assert [s.C for s in c2.sites] == [2 * c for _, c in sites]
    k3 = benchmark.resolve(benchmark.sweep_config(d, "sites", 3, sites), "x")
    assert [(s.name, s.C) for s in k3.sites] == sites[:3]
    t = benchmark.resolve(benchmark.sweep_config(d, "seq", 32, sites), "x")
    assert t.batch_shape == (d["batch_size"], 32) and [(s.name, s.C) for s in t.sites] == sites
    assert d["data"]["seq_len"] == 64  # the base dict is left as it was


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
