"""Who owns a run directory, and who is using it (SPEC S104), once for both backends.

Ownership: `DIR/run.json` records the backend that wrote the directory, the config hash of
the run that created it (or last started it afresh with --no-resume) and the date; it is
written atomically (temp file, fsync, rename) the first time a run uses the directory. A
run of the other backend is refused before anything in the directory is touched: the two
frameworks' checkpoints are different formats, and a fresh start (--no-resume included)
would delete the other backend's work. A directory written before run.json existed is
adopted only when its checkpoints are this backend's (their `meta.json` "backend":
"torch_oracle" or "jax"; an oracle step dir also holds `state.safetensors`, a JAX one
orbax's items); one with other checkpoints, or with metrics.jsonl but no checkpoint to tell
who wrote it, is refused.

Use: `DIR/.lock` is held with `fcntl.flock(LOCK_EX | LOCK_NB)` for the run's lifetime. The
kernel releases a flock when its holder exits in any way (kill -9 included), so a lock
file left behind by a dead process never blocks: the lock, not the file, is what counts.
The holder writes its pid, host, start time and program into the file (cleared on a clean
release) so a refused run can name it. The descriptor is close-on-exec: a child that execs
(wandb's service) does not inherit the lock; a forked child that does not exec would share
it until it exits. flock is advisory and per host on most network file systems."""
from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import re
import socket
from pathlib import Path

from contract.errors import RunDirError, RunDirLocked

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
FORMAT = "vpd-run-dir/1"
METRICS_FILE = "metrics.jsonl"
CKPT_SUBDIR = "checkpoints"
# a backend's name (contract/backend.py) -> (what it is, its command)
LABELS = {"torch": ("the torch oracle", "vpd-oracle"), "jax": ("the JAX trainer", "vpd-train")}
# the "backend" field of a checkpoint's meta.json (S94) -> the backend's name
META_BACKENDS = {"torch_oracle": "torch", "jax": "jax"}
_STEP_RE = re.compile(r"step_\d{8}")


def label(backend: str) -> str:
    """How messages name a backend: "the JAX trainer (vpd-train)"."""
    what, prog = LABELS.get(backend, (repr(backend), "?"))
    return f"{what} ({prog})"


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- the lock
class RunLock:
    """The held lock of one run directory; `release()` (idempotent) gives it up."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # still held: nobody else can be writing it
        except OSError:
            pass
        os.close(fd)  # releases the flock

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder_of(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        rec = json.loads(data.decode()) if data.strip() else {}
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def _describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "a process that has not written its pid yet"
    out = f"pid {holder['pid']} on {holder.get('host', '?')}"
    if holder.get("prog"):
        out += f" ({holder['prog']})"
    if holder.get("started"):
        out += f", started {holder['started']}"
    return out


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise RunDirError(f"--out {path}: exists and is not a directory; give a directory") from e


def lock(out_dir: str | Path, prog: str = "") -> RunLock:
    """Take the exclusive lock of `out_dir` (created if missing) or raise RunDirLocked at
    once, naming the holder's pid."""
    path = Path(out_dir)
    _mkdir(path)
    lf = path / LOCK_FILE
    fd = os.open(lf, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _holder_of(fd)
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise RunDirLocked(f"run directory {path} is in use by another run: {_describe(holder)} holds {lf}; wait for it to end "
                           "(or stop it), or train into another --out", holder) from None
    rec = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(), "prog": prog}
    data = (json.dumps(rec) + "\n").encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    except BaseException:
        os.close(fd)
        raise
    return RunLock(path, fd)


# ---------------------------------------------------------------------------- ownership
def read_run_file(out_dir: str | Path) -> dict | None:
    """The run.json of `out_dir` (None when absent); RunDirError when unreadable."""
    rf = Path(out_dir) / RUN_FILE
    if not rf.is_file():
        return None
    try:
        rec = json.loads(rf.read_text())
    except (OSError, ValueError) as e:
        raise RunDirError(f"{rf}: unreadable ({e}); it names the backend that owns {rf.parent}: restore it, "
                          "or train into another --out") from e
    if not isinstance(rec, dict) or rec.get("backend") not in LABELS:
        raise RunDirError(f"{rf}: no known backend recorded (backend {rec.get('backend') if isinstance(rec, dict) else None!r},"
                          f" expected one of {sorted(LABELS)}); restore it, or train into another --out")
    return rec


def checkpoint_backend(step_dir: Path) -> str | None:
    """The backend that wrote the checkpoint directory `step_dir` ("torch" | "jax"), from its
    meta.json (S94) or, without one, from its files; None when nothing tells."""
    meta = step_dir / "meta.json"
    if meta.is_file():
        try:
            name = json.loads(meta.read_text()).get("backend")
        except (OSError, ValueError, AttributeError):
            name = None
        if name in META_BACKENDS:
            return META_BACKENDS[name]
        if name is not None:
            return f"unknown backend {name!r}"
    if (step_dir / "state.safetensors").is_file():
        return "torch"
    if (step_dir / "_CHECKPOINT_METADATA").is_file() or (step_dir / "state").is_dir():
        return "jax"  # orbax's items (meta.json is copied beside them after the commit)
    return None


def checkpoint_backends(out_dir: str | Path) -> dict[str | None, list[str]]:
    """{backend or None: [step dir names]} of the `checkpoints/step_XXXXXXXX` dirs of
    `out_dir` (temp dirs of interrupted saves are ignored)."""
    root = Path(out_dir) / CKPT_SUBDIR
    found: dict[str | None, list[str]] = {}
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.is_dir() and _STEP_RE.fullmatch(p.name):
                found.setdefault(checkpoint_backend(p), []).append(p.name)
    return found


def _refusal(path: Path, owner: str, backend: str, how: str) -> str:
    return (f"run directory {path} belongs to {label(owner)}, not to {label(backend)} ({how}): checkpoints cross "
            "between frameworks only through `python -m parity.migrate` (README), and --no-resume would "
            f"delete that run's work; train this run into another --out (or continue that one with "
            f"{LABELS[owner][1]})")


def check_owner(out_dir: str | Path, backend: str, config_hash: str, fresh: bool = False) -> dict:
    """Refuse `out_dir` unless it is `backend`'s (or new); record the owner in run.json the
    first time (and again on a fresh start, `fresh`). Returns the run.json record. Call it
    with the directory's lock held."""
    path = Path(out_dir)
    rec = read_run_file(path)
    if rec is not None:
        if rec["backend"] != backend:
            raise RunDirError(_refusal(path, rec["backend"], backend, f"says its {RUN_FILE}"))
        if not fresh:
            return rec
    else:
        found = checkpoint_backends(path)
        other = sorted(b for b in found if b is not None and b != backend)
        if other:
            steps = ", ".join(found[other[0]][:3])
            if other[0] in LABELS:
                raise RunDirError(_refusal(path, other[0], backend, f"by its checkpoints {steps}; it has no {RUN_FILE}"))
            raise RunDirError(f"run directory {path} holds checkpoints of {other[0]} ({steps}) and no {RUN_FILE}; "
                              "train into another --out")
        if backend not in found and (None in found or (path / METRICS_FILE).exists()):
            what = f"{CKPT_SUBDIR}/{found[None][0]}" if None in found else METRICS_FILE
            raise RunDirError(f"run directory {path} holds {what} but no {RUN_FILE} and no checkpoint that tells which "
                              f"backend wrote it; train into another --out (or remove {path / what} to reuse it)")
    new = {"format": FORMAT, "backend": backend, "config_hash": config_hash, "created": _now()}
    if rec is None and backend in checkpoint_backends(path):
        new["adopted"] = "written before run.json existed; adopted for its checkpoints of this backend"
    _write_json_atomic(path / RUN_FILE, new)
    return new


def claim(out_dir: str | Path, backend: str, config_hash: str, fresh: bool = False, prog: str = "") -> RunLock:
    """Lock `out_dir` and check (record) that it is `backend`'s, before anything in it is
    touched: RunDirLocked / RunDirError otherwise (the lock is then released). The caller
    releases the returned lock when the run ends."""
    held = lock(out_dir, prog)
    try:
        check_owner(out_dir, backend, config_hash, fresh)
    except BaseException:
        held.release()
        raise
    return held
