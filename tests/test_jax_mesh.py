"""Data-parallel invariance (SPEC S91): the JAX trajectory of a case is the same on 1, 2, 4
and 8 simulated CPU devices, one subprocess per device count (the count must be set before
JAX starts). Cases include imp-min with beta (global sums inside the log), a shared-scope
persistent source (gradient of the global mean) and subset routing."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from contract.targets import REPO_ROOT

SCRIPT = r"""
import json, sys
import jax
from parity.cases import CASES
from parity.runners import make_inputs, run_jax
from contract.config import parse_config
from contract.resolve import resolve_run
name, n = sys.argv[1], int(sys.argv[2])
case = CASES[name]
d = case.config_dict()
d["runtime"]["mesh"] = {"data": n}
run = resolve_run(parse_config(d))
assert len(jax.devices()) == n, jax.devices()
records, _, _ = run_jax(make_inputs(run, case.precision, 12), grads_at_step0=False)
print(json.dumps(records))
"""


def trajectory(name: str, n: int) -> list[dict]:
    env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", PYTHONPATH=str(REPO_ROOT))
    p = subprocess.run([sys.executable, "-c", SCRIPT, name, str(n)], env=env, cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["traj_tms_ppgd.64"])
def test_trajectory_invariant_to_device_count(name):
    # guards S91, S22 (global imp-min sums), S81 (shared-scope source gradients), S62
    ref = trajectory(name, 1)
    for n in (2, 4, 8):
        got = trajectory(name, n)
        assert len(got) == len(ref)
        for k, (a, b) in enumerate(zip(ref, got)):
            assert set(a) == set(b)
            for key in a:
                err = abs(a[key] - b[key]) / max(abs(a[key]), abs(b[key]), 1e-12)
                assert err <= 1e-10, f"{n} devices, step {k}, {key}: {b[key]!r} vs 1 device {a[key]!r} (rel {err:.1e})"
