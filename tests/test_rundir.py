"""Run directories (SPEC S104) and the CLI's one error surface (S105), for both backends, on
the tiny TMS target:

- ownership: a directory trained by one backend is refused by the other (exit 3, one line
  naming the directory and both backends), --no-resume included, and its checkpoints and
  metrics stay byte for byte; a directory written before run.json is adopted only by the
  backend of its checkpoints;
- the lock: a second run on a locked directory fails at once (exit 4) naming the holder's
  pid; a lock file left by a dead (kill -9) process does not block;
- failures: a full disk during a checkpoint save (exit 7, earlier checkpoints intact),
  MemoryError at setup (8), a mesh larger than the devices (9), a divergence (6), a bug
  (traceback + report note, 70), each one line; a second SIGTERM exits 130 without a
  traceback (subprocesses, both backends); the README documents every exit code.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contract import errors as E
from contract.targets import REPO_ROOT
from loop import cli, rundir
from tests.helpers import hook_cli_backend, tms_config, write_cfg, write_tiny_tms

PROG = {"torch": "vpd-oracle", "jax": "vpd-train"}
OTHER = {"torch": "jax", "jax": "torch"}
pytestmark = [pytest.mark.xdist_group("rundir"), pytest.mark.usefixtures("jax_fast_compiles")]




@pytest.fixture(scope="module")
def cfg_path(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("rundir_cfg")
    cfg = tms_config(write_tiny_tms(d), checkpoint={"every": 2, "keep": 2}, eval={"every": 2, "batch_size": 6})
    return write_cfg(d / "c.yaml", cfg)


def train_cli(backend: str, cfg: str, out: Path, *extra: str) -> int:
    return cli.main(backend, ["train", cfg, "--out", str(out), "--quiet", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cfg_path):
    """A finished 4-step run of each backend (copy it before changing it)."""
    runs = {}
    for b in ("torch", "jax"):
        out = tmp_path_factory.mktemp(f"trained_{b}") / "run"
        assert train_cli(b, cfg_path, out) == 0
        runs[b] = out
    return runs


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def snapshot(d: Path) -> dict[str, str]:
    """sha256 of every file under `d` but the lock file (what a refused run must not touch)."""
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and p.name != rundir.LOCK_FILE}


def one_line(err: str, prog: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: ") and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------- ownership (S104)
@pytest.mark.parametrize("first", ["torch", "jax"])
def test_other_backend_is_refused_and_the_directory_untouched(tmp_path, trained, cfg_path, capsys, first):
    out = copy_run(trained[first], tmp_path / "run")
    assert json.loads((out / rundir.RUN_FILE).read_text())["backend"] == first
    before = snapshot(out)
    assert any(k.startswith("checkpoints/") for k in before) and "metrics.jsonl" in before
    second = OTHER[first]
    capsys.readouterr()
    for extra in ((), ("--no-resume",)):  # --no-resume would delete the other backend's work: refused too
        assert train_cli(second, cfg_path, out, *extra) == E.EXIT_RUN_DIR_OWNED
        line = one_line(capsys.readouterr().err, PROG[second])
        assert f"run directory {out} belongs to {rundir.label(first)}, not to {rundir.label(second)}" in line
        assert "python -m parity.migrate" in line and "another --out" in line
        assert snapshot(out) == before
    # the owner still resumes it (nothing left to train: final eval only)
    assert train_cli(first, cfg_path, out) == 0
    assert "resumed from step 4" in capsys.readouterr().out


@pytest.mark.parametrize("first", ["torch", "jax"])
def test_directory_without_run_json_is_adopted_only_by_its_backend(tmp_path, trained, cfg_path, capsys, first):
    # a directory written before run.json existed: its checkpoints' meta.json tell the backend
    out = copy_run(trained[first], tmp_path / "run")
    (out / rundir.RUN_FILE).unlink()
    before = snapshot(out)
    second = OTHER[first]
    assert train_cli(second, cfg_path, out, "--no-resume") == E.EXIT_RUN_DIR_OWNED
    line = one_line(capsys.readouterr().err, PROG[second])
    assert f"belongs to {rundir.label(first)}" in line and "step_00000004" in line and "no run.json" in line
    assert snapshot(out) == before and not (out / rundir.RUN_FILE).exists()
    assert train_cli(first, cfg_path, out) == 0  # adopted: resumed, and run.json written
    rec = json.loads((out / rundir.RUN_FILE).read_text())
    assert rec["backend"] == first and "adopted" in rec
    assert rec["config_hash"] == json.loads((out / "checkpoints/step_00000004/meta.json").read_text())["config_hash"]


def test_unidentifiable_or_unusable_directories_are_refused(tmp_path, cfg_path, capsys):
    # metrics.jsonl but no checkpoint and no run.json: nobody can tell which backend wrote it
    out = tmp_path / "old"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 0, "loss/total": 1.0}\n')
    before = snapshot(out)
    assert train_cli("torch", cfg_path, out, "--no-resume") == E.EXIT_RUN_DIR_OWNED
    line = one_line(capsys.readouterr().err, "vpd-oracle")
    assert f"run directory {out} holds metrics.jsonl but no run.json" in line and "another --out" in line
    assert snapshot(out) == before
    # --out naming a file
    f = tmp_path / "file"
    f.write_text("x")
    assert train_cli("torch", cfg_path, f) == E.EXIT_RUN_DIR_OWNED
    assert f"--out {f}: exists and is not a directory" in one_line(capsys.readouterr().err, "vpd-oracle")
    # a run.json naming no known backend
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / rundir.RUN_FILE).write_text('{"backend": "tpu"}')
    assert train_cli("torch", cfg_path, bad) == E.EXIT_RUN_DIR_OWNED
    assert f"{bad / rundir.RUN_FILE}: no known backend" in one_line(capsys.readouterr().err, "vpd-oracle")


def test_no_resume_on_own_directory_records_the_new_config(tmp_path, trained, cfg_path):
    out = copy_run(trained["torch"], tmp_path / "run")
    old = json.loads((out / rundir.RUN_FILE).read_text())
    assert train_cli("torch", cfg_path, out, "--no-resume", "--steps", "2") == 0
    new = json.loads((out / rundir.RUN_FILE).read_text())
    meta = json.loads((out / "checkpoints/step_00000002/meta.json").read_text())
    assert new["backend"] == "torch" and new["config_hash"] == meta["config_hash"] != old["config_hash"]


# ---------------------------------------------------------------------------- the lock (S104)
_HOLDER = r"""
import sys, time
from loop.rundir import lock
held = lock(sys.argv[1], "test-holder")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def start_holder(out: Path, seconds: float = 120) -> subprocess.Popen:
    """A process holding `out`'s lock (returns once it holds it)."""
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out), str(seconds)], cwd=REPO_ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    ready, _, _ = select.select([p.stdout], [], [], 60)
    assert ready and p.stdout.readline().strip() == "held", p.stderr
    return p


def stop(p: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    if p.poll() is None:
        p.send_signal(sig)
    p.wait(timeout=60)
    for f in (p.stdout, p.stderr):
        if f is not None:
            f.close()


def test_locked_directory_fails_at_once_naming_the_holder(tmp_path, cfg_path, capsys):
    out = tmp_path / "run"
    holder = start_holder(out)
    try:
        t0 = time.monotonic()
        assert train_cli("torch", cfg_path, out) == E.EXIT_RUN_DIR_LOCKED
        assert time.monotonic() - t0 < 30  # no waiting on the lock (the run itself takes seconds)
        line = one_line(capsys.readouterr().err, "vpd-oracle")
        assert f"run directory {out} is in use by another run: pid {holder.pid} on " in line and "(test-holder)" in line
        # nothing was touched: the ownership check and the loop come after the lock
        assert sorted(p.name for p in out.iterdir()) == [rundir.LOCK_FILE]
        with pytest.raises(E.RunDirLocked) as e:
            rundir.lock(out)
        assert e.value.holder["pid"] == holder.pid
    finally:
        stop(holder)


def test_lock_file_of_a_killed_process_does_not_block(tmp_path, cfg_path, monkeypatch):
    # the kernel drops a flock when its holder dies, kill -9 included; the file it leaves
    # (still naming the dead pid) is no lock
    out = tmp_path / "run"
    holder = start_holder(out)
    stop(holder, signal.SIGKILL)
    assert json.loads((out / rundir.LOCK_FILE).read_text())["pid"] == holder.pid  # left behind
    seen = []
    hook_cli_backend(monkeypatch, after=lambda k: seen.append(json.loads((out / rundir.LOCK_FILE).read_text())))
    assert train_cli("torch", cfg_path, out) == 0
    assert {r["pid"] for r in seen} == {os.getpid()}  # the run wrote itself into the lock file
    assert (out / rundir.LOCK_FILE).read_text() == ""  # cleared on release
    with rundir.lock(out):  # and released
        pass


# ---------------------------------------------------------------------------- failures (S105)
def _tree_hash(d: Path) -> str:
    return hashlib.sha256(json.dumps(snapshot(d)).encode()).hexdigest()


def test_disk_full_during_checkpoint_save_oracle(tmp_path, cfg_path, capsys, monkeypatch):
    import oracle_torch.checkpoint as ock
    out = tmp_path / "run"
    real, calls, at_failure = ock.st.save_file, [], {}

    def full_disk(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # the save of step 4: step 2 is on disk
            at_failure["step2"] = _tree_hash(out / "checkpoints/step_00000002")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ock.st, "save_file", full_disk)
    assert train_cli("torch", cfg_path, out) == E.EXIT_DISK_FULL
    line = one_line(capsys.readouterr().err, "vpd-oracle")
    assert f"disk full: no space left on the device while writing {calls[1]}" in line and "rerun" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]  # no half-written dir
    assert _tree_hash(out / "checkpoints/step_00000002") == at_failure["step2"]
    monkeypatch.setattr(ock.st, "save_file", real)  # space freed: the rerun resumes from step 2
    assert train_cli("torch", cfg_path, out) == 0
    assert "resumed from step 2" in capsys.readouterr().out


# what orbax (tensorstore) raised on a full tmpfs, shortened (the path is the one it names)
ORBAX_ENOSPC = ('RESOURCE_EXHAUSTED: Error writing local file "{path}/_sharding": Failed writing: "{path}/_sharding.__lock": '
                "Failed to write 6727 bytes to file 15: No space left on device [os_error_code='28']")


def test_disk_full_during_checkpoint_save_jax(tmp_path, cfg_path, capsys, monkeypatch):
    import orbax.checkpoint as ocp
    out = tmp_path / "run"
    real, calls = ocp.CheckpointManager.save, []

    def full_disk(self, step, *a, **kw):
        calls.append(step)
        if step == 4:
            raise ValueError(ORBAX_ENOSPC.format(path=out / "checkpoints/step_00000004.orbax-checkpoint-tmp"))
        return real(self, step, *a, **kw)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    assert train_cli("jax", cfg_path, out) == E.EXIT_DISK_FULL
    line = one_line(capsys.readouterr().err, "vpd-train")
    assert f"disk full: no space left on the device while writing {out}/checkpoints/step_00000004" in line
    from jax_impl.checkpoint import list_checkpoints, read_meta
    assert calls == [2, 4] and list_checkpoints(out) == [out / "checkpoints/step_00000002"]
    assert read_meta(out / "checkpoints/step_00000002")["step"] == 2


def test_memory_error_at_setup_is_one_line(tmp_path, cfg_path, capsys, monkeypatch):
    import loop.backends

    def no_memory(name, run):
        raise MemoryError()

    monkeypatch.setattr(loop.backends, "make_backend", no_memory)
    assert train_cli("torch", cfg_path, tmp_path / "run") == E.EXIT_OUT_OF_MEMORY
    line = one_line(capsys.readouterr().err, "vpd-oracle")
    assert "out of memory while setting up the run (MemoryError)" in line and "batch_size" in line


def test_mesh_larger_than_the_devices_is_one_line(tmp_path, cfg_path, capsys):
    import jax
    import yaml
    n = len(jax.devices()) + 1
    d = yaml.safe_load(Path(cfg_path).read_text())
    d["runtime"] = {"mesh": {"data": n}}
    d["batch_size"] = d["eval"]["batch_size"] = 6 * n
    out = tmp_path / "run"
    assert train_cli("jax", write_cfg(tmp_path / "m.yaml", d), out) == E.EXIT_DEVICE
    line = one_line(capsys.readouterr().err, "vpd-train")
    assert f"runtime.mesh.data: {n} devices requested, {n - 1} available" in line and "XLA_FLAGS" in line
    assert not out.exists()  # refused while setting up, before the run directory


def test_divergence_and_checkpoint_errors_are_one_line(tmp_path, cfg_path, capsys, monkeypatch):
    for exc, code in ((E.DivergenceError("loss/total is nan at step 1"), E.EXIT_DIVERGED),
                      (E.CheckpointError("checkpoint X/step_00000002: state.safetensors is damaged"), E.EXIT_CHECKPOINT)):
        def boom(k, exc=exc):
            if k == 1:
                raise exc
        with monkeypatch.context() as mp:
            hook_cli_backend(mp, before=boom)
            assert train_cli("torch", cfg_path, tmp_path / f"run{code}") == code
        assert one_line(capsys.readouterr().err, "vpd-oracle") == f"vpd-oracle: error: {exc}"


def test_unexpected_exception_is_a_bug_with_traceback(tmp_path, cfg_path, capsys, monkeypatch):
    def boom(k):
        if k == 1:
            raise RuntimeError("boom")
    hook_cli_backend(monkeypatch, before=boom)
    out = tmp_path / "run"
    assert train_cli("torch", cfg_path, out) == E.EXIT_BUG
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "RuntimeError: boom" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("vpd-oracle: error: internal error (RuntimeError: boom): this is a bug; please report it")
    with rundir.lock(out):  # the lock was released on the way out
        pass


@pytest.mark.parametrize("exc, phase, code", [
    (E.RunDirLocked("x"), "train", E.EXIT_RUN_DIR_LOCKED),
    (OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/q/f"), "train", E.EXIT_DISK_FULL),
    # what safetensors raised on a full tmpfs; and a full disk wrapped by another error
    (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), "train", E.EXIT_DISK_FULL),
    (ValueError(ORBAX_ENOSPC.format(path="/p")), "train", E.EXIT_DISK_FULL),
    (MemoryError(), "train", E.EXIT_OUT_OF_MEMORY),
    (RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8.00GiB"), "train", E.EXIT_OUT_OF_MEMORY),
    (ValueError("runtime.mesh.data: 4 devices requested, 1 available"), "setup", E.EXIT_DEVICE),
    # the oracle's refusal of a mesh is a config refusal, not a device problem
    (ValueError("runtime.mesh.data: the oracle trains in one process"), "train", E.EXIT_INPUT),
    (ValueError("checkpoint /r/checkpoints/step_00000002: unknown format 'x'"), "train", E.EXIT_CHECKPOINT),
    (ValueError("target JSON /t.json lacks the key 'kind'"), "setup", E.EXIT_INPUT),
    (PermissionError(errno.EACCES, "Permission denied", "/ro/run"), "train", E.EXIT_INPUT),
    (ValueError("train_step: the state is at step 3, asked to run step 4"), "train", E.EXIT_BUG),
    (KeyError("param"), "train", E.EXIT_BUG),
])
def test_classify(exc, phase, code):
    assert cli.classify(exc, "/r", phase)[0] == code
    if code == E.EXIT_DISK_FULL:
        wrapped = RuntimeError("save failed")
        wrapped.__cause__ = exc
        assert cli.classify(wrapped, "/r", phase)[0] == code


def test_every_exit_code_is_documented_in_the_readme():
    text = (REPO_ROOT / "README.md").read_text()
    table = text[text.index("## Exit codes"):]
    table = table[:table.index("\n## ", 4)] if "\n## " in table[4:] else table
    documented = {int(m) for m in re.findall(r"^\| `?(\d+)`? \|", table, flags=re.M)}
    assert documented == set(E.EXIT_CODES), (documented, set(E.EXIT_CODES))
    assert "| 128 + n |" in table or "| `128 + n` |" in table
    classes = [E.VPDError, E.RunDirError, E.RunDirLocked, E.CheckpointError, E.DivergenceError, E.DeviceError]
    assert len({c.exit_code for c in classes}) == len(classes) and {c.exit_code for c in classes} <= set(E.EXIT_CODES)


# ---------------------------------------------------------------------------- a second signal (S102)
_SECOND = r"""
import os, signal, sys, threading
import loop.backends
from loop import cli
from tests.helpers import HookedBackend, signal_after

backend, cfg, out, when = sys.argv[1:5]


def second():
    os.kill(os.getpid(), signal.SIGTERM)


class Second(HookedBackend):
    def save_checkpoint(self, out_dir, state, step, extra):
        if when != "save" or step != 3:
            return self._backend.save_checkpoint(out_dir, state, step, extra)
        # the second SIGTERM while the save's writer threads run (orbax starts several)
        start, sent = threading.Thread.start, []

        def start_then_signal(th):
            start(th)
            if not sent and th.name in ("array_type_handler", "write_metadata_after_commits"):
                sent.append(1)
                second()
        threading.Thread.start = start_then_signal
        try:
            if backend == "torch":  # a synchronous save: signal at its start
                sent.append(1)
                second()
            path = self._backend.save_checkpoint(out_dir, state, step, extra)
        finally:
            threading.Thread.start = start
        if not sent:
            second()
        return path

    def close(self):
        if when == "close":  # after the loop, its handlers restored
            second()
        return self._backend.close()


real = loop.backends.make_backend
loop.backends.make_backend = lambda name, run: Second(real(name, run), after=signal_after(2, signal.SIGTERM))
sys.exit(cli.main(backend, ["train", cfg, "--out", out, "--quiet"]))
"""


@pytest.mark.parametrize("backend, when", [("jax", "save"), ("torch", "save"), ("torch", "close")])
def test_second_sigterm_exits_130_without_traceback(tmp_path, cfg_path, backend, when):
    # first SIGTERM after step 2 (3 steps done): stop and save step 3; the second one during
    # that save (or after the loop) aborts at once: 130, no traceback from any thread, the
    # checkpoint of step 2 stands and the lock is free
    import yaml
    d = yaml.safe_load(Path(cfg_path).read_text())
    d["steps"] = 6
    cfg = write_cfg(tmp_path / "c.yaml", d)
    out = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1", WANDB_MODE="disabled")
    p = subprocess.run([sys.executable, "-c", _SECOND, backend, cfg, str(out), when], cwd=REPO_ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == E.EXIT_ABORTED, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr and "Error" not in p.stderr, p.stderr[-3000:]
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert lines[-1] == (f"{PROG[backend]}: SIGTERM received: aborted at once without saving; the last complete "
                         "checkpoint stands (rerun the same command to resume)"), p.stderr
    steps = sorted(x.name for x in (out / "checkpoints").iterdir() if re.fullmatch(r"step_\d{8}", x.name))
    assert steps == (["step_00000002", "step_00000003"] if when == "close" else ["step_00000002"])
    with rundir.lock(out):
        pass
