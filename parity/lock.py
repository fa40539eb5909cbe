"""The oracle freeze: goldens/oracle.lock holds a hash of every file under oracle_torch/.
A test fails when the oracle changes without the lock being rewritten by the sanctioned
command (`python -m parity.regen --reason ... --update-lock`)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from contract.targets import REPO_ROOT

LOCK_FILE = REPO_ROOT / "goldens" / "oracle.lock"
ORACLE_DIR = REPO_ROOT / "oracle_torch"


def oracle_files() -> list[Path]:
    return sorted(p for p in ORACLE_DIR.rglob("*.py") if "__pycache__" not in p.parts)


def oracle_hash() -> str:
    h = hashlib.sha256()
    for p in oracle_files():
        h.update(p.relative_to(REPO_ROOT).as_posix().encode() + b"\0")
        h.update(p.read_bytes().replace(b"\r\n", b"\n") + b"\0")
    return h.hexdigest()


def file_hashes() -> dict[str, str]:
    return {p.relative_to(REPO_ROOT).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in oracle_files()}


def read_lock() -> dict:
    if not LOCK_FILE.is_file():
        return {}
    return json.loads(LOCK_FILE.read_text())


def write_lock(reason: str, date: str) -> dict:
    lock = {"oracle_hash": oracle_hash(), "files": file_hashes(), "reason": reason, "date": date}
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    LOCK_FILE.write_text(json.dumps(lock, indent=1) + "\n")
    return lock


def lock_problem() -> str | None:
    """None when the oracle matches its lock; else a message naming the changed files."""
    lock = read_lock()
    if not lock:
        return f"{LOCK_FILE} is missing: run `python -m parity.regen --reason ... --update-lock`"
    if lock["oracle_hash"] == oracle_hash():
        return None
    now, then = file_hashes(), lock.get("files", {})
    changed = sorted(f for f in set(now) | set(then) if now.get(f) != then.get(f))
    return ("oracle_torch/ changed without a sanctioned lock update; changed files: " + ", ".join(changed) +
            ". If the change is intended, regenerate goldens with "
            "`python -m parity.regen --reason '...' --update-lock` (logged in goldens/CHANGELOG.md).")
