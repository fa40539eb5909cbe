"""Migration from a JAX checkpoint written on a 2-D mesh (S130, S140): a run trained on
(data 2, components 2) simulated devices migrates to the oracle, verifies leaf by leaf, and
the oracle resumed from it continues the JAX run's trajectory (float64, draws: contract)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from contract.targets import REPO_ROOT
from tests.helpers import tms_config, write_tiny_tms

TIMEOUT = 600


def _run(args: list[str], **env) -> str:
    e = os.environ | {"PYTHONPATH": str(REPO_ROOT), "WANDB_MODE": "disabled"} | env
    try:
        p = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=e, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as x:
        pytest.fail(f"{' '.join(args)}: no exit after {TIMEOUT} s\n{x.stderr}")
    assert p.returncode == 0, f"{' '.join(args)} exited {p.returncode}:\n{p.stderr[-3000:]}"
    return p.stdout


def _metrics(path) -> dict[int, dict]:
    return {(d := json.loads(line))["step"]: d for line in path.read_text().splitlines()}


def test_jax_run_on_a_2d_mesh_migrates_to_the_oracle_and_continues(tmp_path):
    cfg = tms_config(write_tiny_tms(tmp_path), steps=6, batch_size=8, log_every=1, checkpoint={"every": 3, "keep": 5},
                     sites=[{"pattern": "linear1", "C": 4}, {"pattern": "linear2", "C": 6}],
                     runtime={"dtype": "float64", "draws": "contract", "mesh": {"data": 2, "components": 2}})
    (tmp_path / "mesh.yaml").write_text(yaml.safe_dump(cfg))
    cfg["runtime"]["mesh"] = {"data": 1, "components": 1}
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(cfg))
    jax_run, oracle_run = tmp_path / "jax22", tmp_path / "oracle"
    _run(["-m", "jax_impl.cli", "train", str(tmp_path / "mesh.yaml"), "--out", str(jax_run), "--quiet"],
         XLA_FLAGS="--xla_force_host_platform_device_count=4")
    src = jax_run / "checkpoints" / "step_00000003"
    assert json.loads((src / "meta.json").read_text())["config"]["runtime"]["mesh"] == {"data": 2, "components": 2}
    _run(["-m", "parity.migrate", str(src), "--to", "torch", "--out", str(oracle_run), "--mesh-data", "1"])
    out = _run(["-m", "parity.verify", str(src), str(oracle_run / "checkpoints" / "step_00000003")])
    assert "verdict: PASS" in out, out
    _run(["-m", "oracle_torch.cli", "train", str(tmp_path / "one.yaml"), "--out", str(oracle_run), "--quiet"])
    a, b = _metrics(jax_run / "metrics.jsonl"), _metrics(oracle_run / "metrics.jsonl")
    assert sorted(a) == sorted(b) == list(range(6))
    for k in range(3, 6):  # the oracle's own steps after the migrated checkpoint
        assert a[k].keys() == b[k].keys()
        for n, v in a[k].items():
            assert abs(v - b[k][n]) <= 1e-10 * max(abs(v), 1e-300), f"step {k} {n}: JAX {v} vs oracle {b[k][n]}"
