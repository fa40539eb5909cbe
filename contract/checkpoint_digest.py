"""Checkpoint integrity, shared by both trainers (framework-free; SPEC S107).

Every checkpoint directory `checkpoints/step_XXXXXXXX/` ends with `digest.json`, its commit
marker, written last:

    {"format": "vpd-checkpoint-digest/1", "algorithm": "sha256", "step": 6,
     "files": {"meta.json": {"size": 2652, "sha256": "…"},
               "state.safetensors": {"size": 5280, "sha256": "…"}}}

`files` lists every regular file of the directory (relative POSIX paths, recursively, so a
JAX checkpoint lists orbax's files too) except the marker itself. The oracle writes its
state, meta.json and digest.json into a temp dir and renames it into place (the rename is
the commit); orbax commits the JAX directory, then meta.json and digest.json are written
into it, each atomically (temp file + rename), digest.json last.

`verify_checkpoint` runs before a loader reads anything: every listed file must be present
with its size and sha256, otherwise `DamagedCheckpoint` (a `CheckpointError`) names the
checkpoint and the first file that fails. A file the digest does not list is not part of
the checkpoint and is ignored (the loaders read only listed files: the oracle two named
files, orbax the files its listed metadata names), so a stray file never condemns one.

A directory without digest.json is an unfinished save ("incomplete"), unless it predates
digests: its meta.json then lacks the `digest_file` entry every newer meta carries, and the
backend's own files are present. Such a legacy checkpoint loads unverified, after one line
on stderr."""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path, PurePosixPath

from contract.errors import CheckpointError

DIGEST_FILE = "digest.json"
DIGEST_FORMAT = "vpd-checkpoint-digest/1"
META_FILE = "meta.json"  # the metadata file (contract/checkpoint_meta.py)
# the meta.json entry that announces a digest: a meta without it predates checkpoint digests
META_DIGEST_KEY = "digest_file"
STEP_RE = re.compile(r"^step_(\d{8})$")


class DamagedCheckpoint(CheckpointError):
    """A checkpoint directory that fails verification: `problem` names the file and what is
    wrong with it; `state` is "damaged" (a file differs from the digest) or "incomplete"
    (the save did not finish: no digest.json)."""

    def __init__(self, path: str | Path, problem: str, state: str = "damaged"):
        self.path, self.problem, self.state = Path(path), problem, state
        super().__init__(f"checkpoint {path} is {state} ({problem})")


def unreadable(path: str | Path, what: str, e: BaseException) -> DamagedCheckpoint:
    """The DamagedCheckpoint of a file (or orbax item) `what` of checkpoint `path` that its
    reader refused with `e` (the first line of its message, shortened)."""
    msg = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    msg = msg if len(msg) <= 200 else msg[:200] + "…"
    return DamagedCheckpoint(path, f"{what}: unreadable, {type(e).__name__}" + (f": {msg}" if msg else ""))


def step_dirs(root: str | Path) -> list[Path]:
    """The `step_XXXXXXXX` directories under a checkpoints dir, oldest first, complete or
    not (temp dirs of the oracle's and orbax's saves have other names)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_temp(name: str) -> bool:
    """A temp file of `write_json_atomic` (left by a kill mid-write; never part of a checkpoint)."""
    return name.startswith(".") and ".tmp-" in name


def checkpoint_files(step_dir: str | Path) -> list[str]:
    """Every regular file under `step_dir` (relative POSIX paths, sorted), without the
    marker and without temp files of an interrupted atomic write."""
    step_dir = Path(step_dir)
    out = []
    for dirpath, dirnames, filenames in os.walk(step_dir):
        dirnames.sort()
        for name in filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(step_dir).as_posix()
            if rel == DIGEST_FILE or _is_temp(name) or not p.is_file():
                continue
            out.append(rel)
    return sorted(out)


def fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory and hasattr(os, "O_DIRECTORY") else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `path` via a temp file beside it, fsynced, then renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def build_digest(step_dir: str | Path, step: int) -> dict:
    """The digest of every file now in `step_dir` (see the module docstring)."""
    step_dir = Path(step_dir)
    files = {}
    for rel in checkpoint_files(step_dir):
        p = step_dir / rel
        files[rel] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    return {"format": DIGEST_FORMAT, "algorithm": "sha256", "step": step, "files": files}


def write_digest(step_dir: str | Path, step: int) -> dict:
    """Write `step_dir/digest.json` (atomically, fsynced, directory too): the commit marker,
    so call it after every other file of the checkpoint is written and fsynced."""
    step_dir = Path(step_dir)
    digest = build_digest(step_dir, step)
    write_text_atomic(step_dir / DIGEST_FILE, json.dumps(digest, indent=1, sort_keys=True) + "\n")
    fsync_path(step_dir, directory=True)
    return digest


def _read_digest(step_dir: Path, step: int | None) -> dict[str, dict]:
    """The `files` table of `step_dir/digest.json`, checked for shape (DamagedCheckpoint)."""
    try:
        digest = json.loads((step_dir / DIGEST_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DamagedCheckpoint(step_dir, f"{DIGEST_FILE}: unreadable, {type(e).__name__}") from e
    files = digest.get("files") if isinstance(digest, dict) else None
    if not isinstance(digest, dict) or digest.get("format") != DIGEST_FORMAT or digest.get("algorithm") != "sha256" \
            or not isinstance(files, dict):
        raise DamagedCheckpoint(step_dir, f"{DIGEST_FILE}: not a {DIGEST_FORMAT} sha256 digest")
    if step is not None and digest.get("step") != step:
        raise DamagedCheckpoint(step_dir, f"{DIGEST_FILE}: names step {digest.get('step')!r}, the directory step {step}")
    for rel, entry in files.items():
        pp = PurePosixPath(rel)
        if pp.is_absolute() or ".." in pp.parts or rel in ("", ".") or not isinstance(entry, dict) \
                or not isinstance(entry.get("size"), int) or not isinstance(entry.get("sha256"), str):
            raise DamagedCheckpoint(step_dir, f"{DIGEST_FILE}: bad entry {rel!r}")
    if META_FILE not in files:
        raise DamagedCheckpoint(step_dir, f"{DIGEST_FILE}: does not list {META_FILE}")
    return files


def _step_of(step_dir: Path) -> int | None:
    m = STEP_RE.match(step_dir.name)
    return int(m.group(1)) if m else None


def verify_checkpoint(step_dir: str | Path, legacy_files: tuple[str, ...]) -> bool:
    """Check `step_dir` against its digest before anything in it is read: True when verified.
    Without digest.json it is an unfinished save (DamagedCheckpoint, "incomplete") unless it
    is a checkpoint written before digests existed: its meta.json parses and lacks
    `digest_file`, and every path of `legacy_files` (the backend's own files) exists; that
    one is accepted unverified after a one-line note on stderr (False)."""
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        raise CheckpointError(f"checkpoint {step_dir} not found")
    if not (step_dir / DIGEST_FILE).is_file():
        _check_legacy(step_dir, legacy_files)
        print(f"warning: checkpoint {step_dir} has no {DIGEST_FILE} (written before checkpoint digests): "
              "loading it unverified", file=sys.stderr, flush=True)
        return False
    files = _read_digest(step_dir, _step_of(step_dir))
    for rel, entry in files.items():  # sizes first: a missing or truncated file is found without hashing
        p = step_dir / rel
        if not p.is_file():
            raise DamagedCheckpoint(step_dir, f"{rel}: missing")
        size = p.stat().st_size
        if size != entry["size"]:
            raise DamagedCheckpoint(step_dir, f"{rel}: {size} bytes, the digest says {entry['size']}")
    for rel, entry in files.items():
        if file_sha256(step_dir / rel) != entry["sha256"]:
            raise DamagedCheckpoint(step_dir, f"{rel}: sha256 mismatch")
    return True


def _check_legacy(step_dir: Path, legacy_files: tuple[str, ...]) -> None:
    """Accept a digest-less `step_dir` only as a complete checkpoint written before digests."""
    incomplete = DamagedCheckpoint(step_dir, f"{DIGEST_FILE} missing: the save did not finish", "incomplete")
    try:
        meta = json.loads((step_dir / META_FILE).read_text())
    except FileNotFoundError:
        raise incomplete from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DamagedCheckpoint(step_dir, f"{META_FILE}: unreadable, {type(e).__name__} (and no {DIGEST_FILE})") from e
    if not isinstance(meta, dict) or META_DIGEST_KEY in meta:
        raise incomplete  # written with digests: the marker never came
    for rel in legacy_files:
        if not (step_dir / rel).exists():
            raise incomplete


def is_complete(step_dir: str | Path, legacy_files: tuple[str, ...]) -> bool:
    """Cheap completeness test (no hashing): digest.json present, or a legacy checkpoint."""
    step_dir = Path(step_dir)
    if (step_dir / DIGEST_FILE).is_file():
        return True
    try:
        _check_legacy(step_dir, legacy_files)
    except CheckpointError:
        return False
    return True
