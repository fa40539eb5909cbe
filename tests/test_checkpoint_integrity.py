"""Checkpoint integrity (SPEC S107), for both backends, through the one training loop.

Every test copies a finished 6-step reference run (checkpoints at steps 4 and 6, keep 2),
damages it, and resumes it with `loop.train.train`:
- a flipped byte, a truncated file, an emptied file, a missing commit marker (digest.json),
  a JAX step dir committed by orbax but without meta.json, an emptied step dir: the latest
  checkpoint is refused by a direct load (CheckpointError, one line naming the file and the
  step); the resume says so on stderr in one line and falls back to step 4, leaves the
  damaged dir on disk until the replay rewrites it, and ends bitwise equal to the
  uninterrupted run (state and metrics.jsonl);
- every checkpoint damaged: one-line error (library: CheckpointError; CLI: exit 5), nothing
  in the run directory changed;
- a damaged older checkpoint is rotated out by `keep` without a crash;
- checkpoints written before digests (no digest.json, no `digest_file` in meta.json) load
  unverified after a one-line warning.

JAX: one JaxBackend for the module (one compile), compiled without XLA optimisations as in
tests/test_jax_train.py."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from contract.errors import EXIT_CHECKPOINT, CheckpointError
from tests.helpers import HookedBackend, crash_at, run_of, tms_config, write_cfg, write_tiny_tms

BACKENDS = ("torch", "jax")
STEP4, STEP6 = "step_00000004", "step_00000006"




@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt_integrity")
    cfg = tms_config(write_tiny_tms(d), steps=6, log_every=1, data={"feature_probability": 0.4},
                     eval={"every": 3, "batch_size": 8}, checkpoint={"every": 2, "keep": 2})
    return d, cfg


class Ref:
    """A backend object for the module's run (reused by every training of the module) and
    its uninterrupted training."""

    def __init__(self, backend, out: Path):
        from loop.train import train
        self.backend, self.out = backend, out
        s = train(backend, out, progress=False)
        assert s["step"] == 6 and not s["interrupted"]
        assert [p.name for p in backend.list_checkpoints(out)] == [STEP4, STEP6]


@pytest.fixture(scope="module")
def torch_ref(tiny) -> Ref:
    from oracle_torch.backend import OracleBackend
    return Ref(OracleBackend(run_of(tiny[1])), tiny[0] / "ref_torch")


@pytest.fixture(scope="module")
def jax_ref(tiny, jax_fast_compiles) -> Ref:
    from jax_impl.backend import JaxBackend
    return Ref(JaxBackend(run_of(tiny[1])), tiny[0] / "ref_jax")


@pytest.fixture
def refs(request):
    """backend name -> its Ref (only the backends a test asks for are built)."""
    return lambda name: request.getfixturevalue(f"{name}_ref")


def _copy(ref: Ref, dst: Path) -> Path:
    shutil.copytree(ref.out, dst)
    return dst


def _snapshot(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".lock"}


def _state_file(step_dir: Path) -> str:
    """The file holding the tensors: the oracle's safetensors, or the largest array-data file
    of orbax's `state` item."""
    if (step_dir / "state.safetensors").is_file():
        return "state.safetensors"
    data = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data, f"no orbax data file under {step_dir / 'state'}"
    best = max(data, key=lambda p: (p.stat().st_size, p.name))
    return best.relative_to(step_dir).as_posix()


def _flip(p: Path) -> None:
    b = bytearray(p.read_bytes())
    if p.name == "state.safetensors":  # a byte of the tensor data, past the header: loads silently if unverified
        i = 8 + int.from_bytes(b[:8], "little") + (len(b) - 8 - int.from_bytes(b[:8], "little")) // 2
    else:
        i = len(b) // 2
    b[i] ^= 0x10
    p.write_bytes(bytes(b))


def damage(step_dir: Path, kind: str) -> tuple[str, str]:
    """Damage a checkpoint dir; -> (what the message must contain, damaged / incomplete)."""
    if kind == "flip":
        rel = _state_file(step_dir)
        _flip(step_dir / rel)
        return f"({rel}: sha256 mismatch)", "damaged"
    if kind == "truncate":
        rel = _state_file(step_dir)
        p = step_dir / rel
        n = p.stat().st_size
        with open(p, "r+b") as f:
            f.truncate(n // 2)
        return f"({rel}: {n // 2} bytes, the digest says {n})", "damaged"
    if kind == "empty_file":  # the metadata orbax itself reads (JAX) / meta.json (oracle)
        rel = "_CHECKPOINT_METADATA" if (step_dir / "_CHECKPOINT_METADATA").is_file() else "meta.json"
        n = (step_dir / rel).stat().st_size
        (step_dir / rel).write_bytes(b"")
        return f"({rel}: 0 bytes, the digest says {n})", "damaged"
    if kind == "no_marker":  # killed before the commit marker
        (step_dir / "digest.json").unlink()
        return "(digest.json missing: the save did not finish)", "incomplete"
    if kind == "no_meta":  # JAX: killed between orbax's commit and meta.json
        (step_dir / "digest.json").unlink()
        (step_dir / "meta.json").unlink()
        return "(digest.json missing: the save did not finish)", "incomplete"
    if kind == "empty_dir":
        for p in list(step_dir.iterdir()):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        return "(digest.json missing: the save did not finish)", "incomplete"
    raise ValueError(kind)


def _final_state(be, out: Path) -> dict[str, np.ndarray]:
    state, _ = be.load_checkpoint(out / "checkpoints" / STEP6)
    return be.export_state(state)


def assert_same_as_ref(ref: Ref, out: Path) -> None:
    a, b = _final_state(ref.backend, ref.out), _final_state(ref.backend, out)
    assert sorted(a) == sorted(b)
    bad = [n for n in a if a[n].dtype != b[n].dtype or a[n].shape != b[n].shape or a[n].tobytes() != b[n].tobytes()]
    assert bad == []
    assert (out / "metrics.jsonl").read_bytes() == (ref.out / "metrics.jsonl").read_bytes()


KINDS = ("flip", "truncate", "empty_file", "no_marker", "no_meta", "empty_dir")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", BACKENDS)
def test_damaged_latest_checkpoint_falls_back_to_the_previous(refs, tmp_path, capsys, name, kind):
    from loop.train import train
    ref = refs(name)
    be = ref.backend
    out = _copy(ref, tmp_path / "run")
    bad = out / "checkpoints" / STEP6
    needle, state = damage(bad, kind)
    damaged_bytes = _snapshot(bad)

    # a direct load refuses it: one line naming the step dir and the file
    with pytest.raises(CheckpointError) as ei:
        be.load_checkpoint(bad)
    msg = str(ei.value)
    assert "\n" not in msg and f"checkpoints/{STEP6} is {state} {needle}" in msg, msg
    capsys.readouterr()
    if state == "incomplete":  # not complete: the tools' latest_checkpoint skips it
        assert be.latest_checkpoint(out) == out / "checkpoints" / STEP4

    # the resume falls back to step 4; the damaged dir stays on disk (until step 6 is saved again)
    seen: list[int] = []

    def still_there(k: int) -> None:
        seen.append(k)
        assert _snapshot(bad) == damaged_bytes

    s = train(HookedBackend(be, before=still_there), out, progress=False)
    assert seen == [4, 5] and s["start_step"] == 4 and s["step"] == 6 and not s["interrupted"]
    err = [x for x in capsys.readouterr().err.splitlines() if "checkpoint" in x]
    assert err == [f"{be.prog}: warning: checkpoint {STEP6} is {state} {needle}; resuming from {STEP4}"]
    assert_same_as_ref(ref, out)
    assert [p.name for p in be.list_checkpoints(out)] == [STEP4, STEP6]
    be.load_checkpoint(bad)  # rewritten, intact


@pytest.mark.parametrize("name", BACKENDS)
def test_every_checkpoint_damaged_is_one_line_error_and_nothing_changes(refs, tmp_path, capsys, name, tiny):
    from loop import cli
    from loop.train import train
    ref = refs(name)
    out = _copy(ref, tmp_path / "run")
    n6, _ = damage(out / "checkpoints" / STEP6, "flip")
    n4, _ = damage(out / "checkpoints" / STEP4, "truncate")
    before = _snapshot(out)
    with pytest.raises(CheckpointError) as ei:
        train(ref.backend, out, progress=False)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"no intact checkpoint to resume from in {out / 'checkpoints'}: ")
    assert f"checkpoint {STEP6} is damaged {n6}; checkpoint {STEP4} is damaged {n4}; nothing was overwritten" in msg
    assert _snapshot(out) == before
    # the CLI: that line, exit code 5, still nothing written
    cfg_path = write_cfg(tmp_path / "cfg.yaml", tiny[1])
    capsys.readouterr()
    assert cli.main(name, ["train", cfg_path, "--out", str(out), "--quiet"]) == EXIT_CHECKPOINT
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert lines == [f"{ref.backend.prog}: error: {msg}"]
    assert _snapshot(out) == before


@pytest.mark.parametrize("name", BACKENDS)
def test_damaged_older_checkpoint_rotates_out(refs, tmp_path, capsys, name):
    # keep 2: a run that crashed in step 5 has checkpoints 2 and 4; step 2 damaged (for JAX
    # the file orbax's rotation reads) is never tried, and the save of step 6 rotates it out
    from loop.train import train
    ref = refs(name)
    be = ref.backend
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom"):
        train(HookedBackend(be, before=crash_at(5)), out, progress=False)
    old = out / "checkpoints" / "step_00000002"
    assert [p.name for p in be.list_checkpoints(out)] == [old.name, STEP4]
    damage(old, "empty_file" if name == "jax" else "flip")
    capsys.readouterr()
    s = train(be, out, progress=False)
    assert s["start_step"] == 4
    assert "resuming from" not in capsys.readouterr().err  # nothing was skipped
    assert [p.name for p in be.list_checkpoints(out)] == [STEP4, STEP6] and not old.exists()
    assert_same_as_ref(ref, out)


@pytest.mark.parametrize("name", BACKENDS)
def test_checkpoints_without_digest_load_unverified_with_a_warning(refs, tmp_path, capsys, name):
    # written before this change: no digest.json, no "digest_file" in meta.json
    from loop.train import train
    ref = refs(name)
    be = ref.backend
    out = _copy(ref, tmp_path / "run")
    shutil.rmtree(out / "checkpoints" / STEP6)  # resume from the legacy step 4 and replay
    legacy = out / "checkpoints" / STEP4
    (legacy / "digest.json").unlink()
    meta = json.loads((legacy / "meta.json").read_text())
    del meta["digest_file"]
    (legacy / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    assert be.latest_checkpoint(out) == legacy
    capsys.readouterr()
    s = train(be, out, progress=False)
    assert s["start_step"] == 4
    err = [x for x in capsys.readouterr().err.splitlines() if "checkpoint" in x]
    assert err == [f"warning: checkpoint {legacy} has no digest.json (written before checkpoint digests): "
                   "loading it unverified"]
    assert_same_as_ref(ref, out)
    assert (out / "checkpoints" / STEP6 / "digest.json").is_file()  # the new ones carry one
    # without its own files it is not a checkpoint, legacy or not
    if name == "torch":
        (legacy / "state.safetensors").unlink()
    else:
        shutil.rmtree(legacy / "state")
    with pytest.raises(CheckpointError, match=f"{STEP4} is incomplete"):
        be.load_checkpoint(legacy)


def test_digest_lists_every_file_and_ignores_strays(refs, tmp_path):
    # the on-disk format: every file of the step dir but the marker, with size and sha256;
    # a stray file is not part of the checkpoint; a digest naming another step is refused
    from contract.checkpoint_digest import DIGEST_FORMAT, checkpoint_files, file_sha256, verify_checkpoint
    for name in BACKENDS:
        ref = refs(name)
        out = _copy(ref, tmp_path / name)
        ck = out / "checkpoints" / STEP6
        d = json.loads((ck / "digest.json").read_text())
        assert d["format"] == DIGEST_FORMAT and d["algorithm"] == "sha256" and d["step"] == 6
        assert sorted(d["files"]) == checkpoint_files(ck) and "meta.json" in d["files"]
        if name == "torch":
            assert sorted(d["files"]) == ["meta.json", "state.safetensors"]
        else:
            assert {"meta.json", "_CHECKPOINT_METADATA", "state/_METADATA"} <= set(d["files"])
        for rel, e in d["files"].items():
            assert e == {"size": (ck / rel).stat().st_size, "sha256": file_sha256(ck / rel)}
        assert json.loads((ck / "meta.json").read_text())["digest_file"] == "digest.json"
        (ck / "notes.txt").write_text("a stray file")
        assert verify_checkpoint(ck, ()) is True
        d["step"] = 4
        (ck / "digest.json").write_text(json.dumps(d))
        with pytest.raises(CheckpointError, match="digest.json: names step 4"):
            ref.backend.load_checkpoint(ck)
