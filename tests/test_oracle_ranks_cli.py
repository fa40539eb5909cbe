"""The oracle on N data ranks through its command line (S108-S111, S113): the CLI starts the
ranks itself or joins torchrun's, trains the one-process trajectory, resumes across world
sizes from either checkpoint format, refuses a bad launcher environment, and a rank that
dies takes the run down with its name (no hang). Every run is a subprocess with a timeout."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from contract.targets import REPO_ROOT
from tests.helpers import tms_config, write_tiny_tms

pytestmark = pytest.mark.xdist_group("oracle_ranks")  # with test_oracle_ranks.py: <= 4 ranks at once
TIMEOUT = 300
STEPS = 6


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return env | {"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "VPD_DIST_TIMEOUT_S": "60",
                  "WANDB_MODE": "disabled"} | extra


def _run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env or _env(), capture_output=True,
                              text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(args)}: no exit after {TIMEOUT} s (a rank hung?)\n{e.stderr}")


def _train(config: Path, out: Path, torchrun: int = 0, env: dict | None = None) -> None:
    cmd = ["-m", "oracle_torch.cli", "train", str(config), "--out", str(out), "--quiet"]
    if torchrun:
        cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}", "--max-restarts=0",
               "--monitor-interval=0.2", *cmd]
    p = _run(cmd, env)
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}:\n{p.stderr[-4000:]}"


def _metrics(out: Path) -> dict[int, dict]:
    return {(d := json.loads(line))["step"]: d for line in (out / "metrics.jsonl").read_text().splitlines()}


def _same_metrics(a: Path, b: Path, rtol: float) -> float:
    ma, mb = _metrics(a), _metrics(b)
    assert ma.keys() == mb.keys(), f"steps {sorted(ma)} vs {sorted(mb)}"
    worst = 0.0
    for k in ma:
        assert ma[k].keys() == mb[k].keys(), f"step {k}: {sorted(set(ma[k]) ^ set(mb[k]))}"
        for n, v in ma[k].items():
            err = abs(v - mb[k][n]) / max(abs(v), 1e-300)
            assert err <= rtol, f"step {k} {n}: {v} vs {mb[k][n]} (rel {err:.1e} > {rtol:.0e})"
            worst = max(worst, err)
    return worst


def _final_state(out: Path) -> dict[str, np.ndarray]:
    """Every tensor of the run's last checkpoint, whole, whichever format."""
    from contract.checkpoint_meta import read_meta
    from oracle_torch import checkpoint, sharded_checkpoint
    ck = checkpoint.latest_checkpoint(out)
    assert ck is not None and ck.name == f"step_{STEPS:08d}"
    if read_meta(ck)["format"] == sharded_checkpoint.DCP_FORMAT:
        return {n: t.numpy() for n, t in sharded_checkpoint.read_whole(ck).items()}
    import safetensors.torch as st
    return {n: t.numpy() for n, t in st.load_file(str(ck / checkpoint.STATE_FILE)).items()}


def _same_state(a: Path, b: Path, rtol: float) -> None:
    sa, sb = _final_state(a), _final_state(b)
    assert sa.keys() == sb.keys(), sorted(set(sa) ^ set(sb))
    for n in sa:
        x, y = sa[n].astype(np.float64), sb[n].astype(np.float64)
        scale = max(float(np.max(np.abs(x))), 1e-300)
        assert float(np.max(np.abs(x - y))) / scale <= rtol, f"final {n} differs"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Configs at 1, 2 and 4 ranks (float64; persistent PGD with shared and per-position sources,
    eval and checkpoints every 3 steps) and the one-process run everything is compared with."""
    d = tmp_path_factory.mktemp("ranks_cli")
    cfg = tms_config(write_tiny_tms(d, rng="torch"), steps=STEPS, batch_size=8, log_every=1,
                     checkpoint={"every": 3, "keep": 5}, eval={"every": 3, "batch_size": 4},
                     runtime={"dtype": "float64"})
    cfg["loss_terms"] += [{"type": "persistent_pgd_recon", "coeff": 0.5, "scope": "c", "n_warmup": 1,
                           "optimizer": {"type": "adam", "lr": {"start": 0.05}}},
                          {"type": "persistent_pgd_recon", "coeff": 0.3, "scope": "bsc", "bundle": "rows",
                           "optimizer": {"type": "adam", "lr": {"start": 0.03}}}]
    configs = {}
    for n in (1, 2, 4):
        cfg["runtime"]["mesh"] = {"data": n}
        configs[n] = d / f"ranks{n}.yaml"
        configs[n].write_text(yaml.safe_dump(cfg))
    _train(configs[1], d / "one")
    return d, configs


def _resumed(d: Path, src: Path, config: Path, name: str) -> Path:
    """A copy of run `src` cut back to its step-3 checkpoint, then resumed with `config`."""
    out = d / name
    shutil.copytree(src, out)
    shutil.rmtree(out / "checkpoints" / f"step_{STEPS:08d}")
    _train(config, out)
    return out


def test_cli_starts_the_ranks_and_trains_the_one_process_trajectory(runs):
    d, configs = runs
    _train(configs[2], d / "two")
    _same_metrics(d / "one", d / "two", 1e-10)
    _same_state(d / "one", d / "two", 1e-10)
    from contract.checkpoint_meta import read_meta
    ck = d / "two" / "checkpoints" / f"step_{STEPS:08d}"
    assert read_meta(ck)["world_size"] == 2 and {p.name for p in ck.glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}


def test_torchrun_joins_and_trains_the_same(runs):
    d, configs = runs
    _train(configs[2], d / "torchrun", torchrun=2)
    _same_metrics(d / "one", d / "torchrun", 1e-10)


@pytest.mark.parametrize("src_world, dst_world", [(2, 1), (1, 4), (4, 2)])
def test_resume_across_world_sizes_continues_the_trajectory(runs, src_world, dst_world):
    d, configs = runs
    src = d / {1: "one", 2: "two", 4: "four"}[src_world]
    if not (src / "metrics.jsonl").exists():
        _train(configs[src_world], src)
    out = _resumed(d, src, configs[dst_world], f"resume_{src_world}_to_{dst_world}")
    _same_metrics(d / "one", out, 1e-10)
    _same_state(d / "one", out, 1e-10)


def test_half_set_launcher_environment_is_refused(runs):
    d, configs = runs
    p = _run(["-m", "oracle_torch.cli", "train", str(configs[2]), "--out", str(d / "half")],
             _env(RANK="0", WORLD_SIZE="2"))
    assert p.returncode == 2, p.stderr
    assert "half set" in p.stderr and "LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing" in p.stderr, p.stderr
    assert not (d / "half").exists()


def test_launcher_world_size_other_than_the_config_is_refused(runs):
    d, configs = runs
    p = _run(["-m", "oracle_torch.cli", "train", str(configs[2]), "--out", str(d / "mismatch")],
             _env(RANK="0", WORLD_SIZE="3", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1"))
    assert p.returncode == 2, p.stderr
    assert "runtime.mesh.data: 2 ranks in the config, but the launcher started WORLD_SIZE=3" in p.stderr, p.stderr


@pytest.mark.parametrize("where", ["step", "save"])
def test_a_dying_rank_stops_the_run_and_is_named(runs, where):
    """Rank 1 is killed before step 4, or while the ranks write the step-6 checkpoint: the
    run stops (no hang), the launcher names rank 1, and the step-3 checkpoint is intact and
    resumes on one process to the uninterrupted trajectory (a half-written save leaves no
    step directory)."""
    d, configs = runs
    out = d / f"dies_{where}"
    code = ("import sys; from oracle_torch.launch import launch; "
            f"sys.exit(launch(2, ['train', {str(configs[2])!r}, '--out', {str(out)!r}, '--quiet'], "
            "'vpd-oracle', module='tests.rank_fault'))")
    fault = {"VPD_TEST_DIE_RANK": "1", "VPD_TEST_DIE_STEP": "4" if where == "step" else str(STEPS)}
    p = _run(["-c", code], _env(**fault, **({"VPD_TEST_DIE_IN_SAVE": "1"} if where == "save" else {})))
    assert p.returncode == 128 + 9, p.stderr[-3000:]  # the launcher returns the dead rank's own status
    assert "vpd-oracle: error: rank 1 of 2 failed (killed by signal 9)" in p.stderr, p.stderr[-3000:]
    steps = sorted(c.name for c in (out / "checkpoints").glob("step_*"))
    assert steps == ["step_00000003"], steps
    _train(configs[1], out)
    _same_metrics(d / "one", out, 1e-10)
    _same_state(d / "one", out, 1e-10)


def test_sigterm_to_the_command_stops_every_rank_at_one_step_and_saves(runs):
    """S102/S113: SIGTERM to `python -m oracle_torch.cli` reaches both ranks through torchrun;
    they agree on the step, save its checkpoint together and the command exits 143."""
    import signal
    import time
    d, configs = runs
    cfg = yaml.safe_load(configs[2].read_text()) | {"steps": 100000}
    long_cfg = d / "long2.yaml"
    long_cfg.write_text(yaml.safe_dump(cfg))
    out = d / "sigterm"
    p = subprocess.Popen([sys.executable, "-m", "oracle_torch.cli", "train", str(long_cfg), "--out", str(out), "--quiet"],
                         cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ((out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 5):
            assert p.poll() is None and time.monotonic() < deadline, "the run ended or stalled before its 5th step"
            time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=TIMEOUT)
    finally:
        p.kill()
    assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
    last = max(_metrics(out))
    saved = sorted(c.name for c in (out / "checkpoints").glob("step_*"))[-1]
    assert saved == f"step_{last + 1:08d}", (saved, last)  # the step after the last one trained, on both ranks
    assert f"interrupted by SIGTERM at step {last + 1}" in err, err[-3000:]
