"""The JAX trainer over several meshes and processes through its command line (SPEC S145-S147):
checkpoints resume across meshes and process counts on the uninterrupted trajectory, a state
a mesh cannot hold is refused with its sizes, and a half-set environment, mismatched counts,
a process that never joins or one that dies give one line naming it, never a hang."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from contract.targets import REPO_ROOT

pytestmark = [pytest.mark.xdist_group("jax_mesh")]
TIMEOUT = 600


def _config(tmp: Path, name: str, mesh: tuple[int, int], steps: int = 12, dtype: str = "float64") -> Path:
    c = yaml.safe_load((REPO_ROOT / "configs" / "tms_5-2.yaml").read_text())
    c["target"]["weights"] = str(REPO_ROOT / c["target"]["weights"])
    c |= {"steps": steps, "batch_size": 16, "log_every": 1, "faithfulness_warmup": {"steps": 2, "lr": 1e-3},
          "eval": {"every": 4, "batch_size": 16}, "checkpoint": {"every": 4, "keep": 3},
          "runtime": {"dtype": dtype, "mesh": {"data": mesh[0], "components": mesh[1]}}}
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(c))
    return p


def _env(devices: int | None = 4, **more) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT), WANDB_MODE="disabled", **more)
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_NUM_CPU_DEVICES",
              "JAX_ENABLE_X64"):
        if k not in more:
            env.pop(k, None)
    if devices is None:
        env.pop("XLA_FLAGS", None)
    else:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def train(cfg: Path, out: Path, *extra: str, env: dict | None = None, timeout: int = TIMEOUT):
    return subprocess.run([sys.executable, "-m", "jax_impl.cli", "train", str(cfg), "--out", str(out), "--quiet",
                           *extra], env=env or _env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _from_checkpoint(src: Path, dst: Path, step: int) -> Path:
    """A copy of run dir `src` holding only its checkpoint at `step` (as if it had stopped there)."""
    shutil.copytree(src, dst)
    for ck in (dst / "checkpoints").iterdir():
        if ck.name != f"step_{step:08d}":
            shutil.rmtree(ck)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


def _worst(ref: list[dict], got: list[dict], first: int) -> float:
    """Worst relative difference of every metric of the lines of steps >= first (the lines
    before it must be identical: copied from the source run)."""
    assert [x["step"] for x in ref] == [x["step"] for x in got]
    worst = 0.0
    for a, b in zip(ref, got, strict=True):
        assert set(a) == set(b), (a["step"], set(a) ^ set(b))
        if a["step"] < first:
            assert a == b, a["step"]
            continue
        for k in a:
            worst = max(worst, abs(a[k] - b[k]) / max(abs(a[k]), abs(b[k]), 1e-12))
    return worst


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mesh_resume")
    out = tmp / "ref"
    p = train(_config(tmp, "m11", (1, 1)), out)
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp, out


def test_resume_across_meshes(uninterrupted):
    # S145: 1 -> (2,2) at step 4, (2,2) -> (4,1) at step 8: every continuation equals the
    # uninterrupted one-device run (float64, reassociation only) and every checkpoint records
    # the mesh it was written on
    tmp, ref = uninterrupted
    want = metrics(ref)
    b = _from_checkpoint(ref, tmp / "to22", 4)
    p = train(_config(tmp, "m22", (2, 2)), b)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from step 4" in p.stdout
    assert _worst(want, metrics(b), 4) <= 1e-10
    meta = json.loads((b / "checkpoints" / "step_00000008" / "meta.json").read_text())
    assert meta["mesh"] == {"data": 2, "components": 2, "processes": 1, "devices": 4}

    d = _from_checkpoint(b, tmp / "to41", 8)
    p = train(_config(tmp, "m41", (4, 1)), d)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from step 8" in p.stdout
    assert _worst(want, metrics(d), 4) <= 1e-10



@pytest.mark.processes
def test_resume_across_process_counts(uninterrupted):
    # S145: 1 process -> 2 processes at step 4, 2 processes -> 1 at step 8, as above
    tmp, ref = uninterrupted
    want = metrics(ref)
    e = _from_checkpoint(ref, tmp / "to2proc", 4)
    p = train(_config(tmp, "m22p", (2, 2)), e, "--processes", "2", env=_env(None))
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("resumed from step 4") == 1  # the summary comes from process 0 alone
    assert _worst(want, metrics(e), 4) <= 1e-10
    meta = json.loads((e / "checkpoints" / "step_00000008" / "meta.json").read_text())
    assert meta["mesh"] == {"data": 2, "components": 2, "processes": 2, "devices": 4}

    f = _from_checkpoint(e, tmp / "from2proc", 8)
    p = train(_config(tmp, "m11b", (1, 1)), f, env=_env(1))
    assert p.returncode == 0, p.stderr[-3000:]
    assert _worst(want, metrics(f), 4) <= 1e-10


def test_state_a_mesh_cannot_hold_is_refused(uninterrupted, tmp_path):
    # S140/S145: on the command line the config's K is refused naming the site, C and K; a state
    # restored onto a mesh that cannot lay it out is refused naming the leaf and the sizes
    tmp, ref = uninterrupted
    out = _from_checkpoint(ref, tmp_path / "k3", 4)
    p = train(_config(tmp_path, "m13", (1, 3)), out, env=_env(3))
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == (
        "vpd-train: error: runtime.mesh.components: site 'linear1' has C = 40, not divisible by "
        "runtime.mesh.components = 3; choose a K that divides every site's C")
    code = r"""
import dataclasses, sys
from contract.runlog import load_run
from jax_impl.checkpoint import check_mesh
from contract.config import MeshConfig
run = load_run(sys.argv[1], None, None)
rt = run.cfg.runtime.model_copy(update={"mesh": MeshConfig(data=1, components=3)})  # past the resolver
run = dataclasses.replace(run, cfg=run.cfg.model_copy(update={"runtime": rt}))
try:
    check_mesh({"mesh": {"data": 2, "components": 2}}, run, "float64", "CK")
except ValueError as e:
    print(e)
"""
    p = subprocess.run([sys.executable, "-c", code, str(_config(tmp_path, "m11", (1, 1)))], env=_env(1), cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert p.stdout.startswith("runtime.mesh.components: the state leaf params.components.linear1.U has 40 along "
                               "dimension 0 (shape (40, 2)), not divisible by components = 3"), p.stdout + p.stderr
    assert "(checkpoint CK was written on data 2 x components 2)" in p.stdout


def _last_line(p) -> str:
    return p.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("env,extra,want", [
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234"}, (),
     "multi-process environment half set: JAX_COORDINATOR_ADDRESS=127.0.0.1:1234 but JAX_NUM_PROCESSES, "
     "JAX_PROCESS_ID unset"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "3", "JAX_PROCESS_ID": "0"}, ("--processes", "2"),
     "--processes 2 but JAX_NUM_PROCESSES=3"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, (),
     "JAX_PROCESS_ID=2 is not a process of JAX_NUM_PROCESSES=2"),
    ({}, ("--processes", "3"), "runtime.mesh: data 2 x components 2 = 4 devices cannot be split evenly over 3 processes"),
])
def test_bad_process_setups_are_one_line(tmp_path, env, extra, want):
    p = train(_config(tmp_path, "m22", (2, 2), steps=2), tmp_path / "out", *extra, env=_env(None, **env), timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert _last_line(p).startswith("vpd-train: error: ") and want in _last_line(p), _last_line(p)
    assert not (tmp_path / "out").exists()


def test_a_process_that_never_joins_times_out(tmp_path):
    # process 0 of 2 started alone: the join gives up after VPD_JAX_JOIN_TIMEOUT s, naming it
    env = _env(None, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_port()}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="0",
               VPD_JAX_JOIN_TIMEOUT="5")
    t0 = time.monotonic()
    p = train(_config(tmp_path, "m22", (2, 2), steps=2), tmp_path / "out", env=env, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "process 0 of 2 could not join the run" in _last_line(p) and "within 5 s" in _last_line(p), _last_line(p)
    assert time.monotonic() - t0 < 90


def _port() -> int:
    from jax_impl.launch import _free_port
    return _free_port()


def test_a_dead_process_stops_the_run_and_is_named(tmp_path):
    # S147: process 1 killed mid-run: the launcher stops process 0 (no hang) and names process 1
    out = tmp_path / "out"
    cfg = _config(tmp_path, "m22", (2, 2), steps=100000, dtype="float32")
    launcher = subprocess.Popen([sys.executable, "-m", "jax_impl.cli", "train", str(cfg), "--out", str(out), "--quiet",
                                 "--processes", "2"], env=_env(None), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().count("\n") >= 2:
            assert launcher.poll() is None, launcher.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run never logged a step"
            time.sleep(0.5)
        children = _children(launcher.pid)
        assert len(children) == 2, children
        os.kill(children[1], signal.SIGKILL)
        _, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 128 + signal.SIGKILL
    assert "vpd-train: error: process 1 of 2 failed (killed by signal 9)" in err, err[-2000:]
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


def _children(pid: int) -> list[int]:
    """The launcher's processes in start order (process 0 first)."""
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return sorted(int(k) for k in kids)
