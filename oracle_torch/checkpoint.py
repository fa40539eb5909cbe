"""Checkpoints of the torch oracle (the JAX mirror is jax_impl/checkpoint.py).

Layout: `out_dir/checkpoints/step_{step:08d}/` holds
- `state.safetensors`: every trainable tensor by its flat name (`components.*`, `ci_fn.*`,
  contract/init.py), the AdamW state per group `g` in {components, ci_fn}:
  `opt.{g}.exp_avg.{param}`, `opt.{g}.exp_avg_sq.{param}` and the group's step counter
  `opt.{g}.step` (torch keeps one per param; all params of a group step together); the
  persistent-PGD sources `sources.{bundle}.{site}` with their ascent moments
  `opt.sources.exp_avg.sources.{bundle}.{site}`, `opt.sources.exp_avg_sq.…` and counter
  `opt.sources.{bundle}.step`; and the training counter `step` (int64). Names follow
  contract/layout.py.
- `meta.json`: step, the resolved config (`run.cfg.to_dict()`) and its hash, dtype, the
  sha256 of the target weights, library versions, date, and `extra` (training-state
  notes such as the faithfulness-warmup losses); built and checked by
  contract/checkpoint_meta.py, shared with the JAX trainer.
- `digest.json`: size and sha256 of the two files above, written last (the commit marker;
  contract/checkpoint_digest.py, shared with the JAX trainer).

A save is atomic: state, meta and digest are written into a hidden temp dir beside the
final one, fsynced, then renamed into place (the rename is the commit); a crash mid-save
leaves the previous checkpoints intact and no half-written `step_*` dir. Only the last
`keep` checkpoints are kept (damaged ones count, and rotate out like any other).
A load verifies the digest before reading a tensor: a missing, truncated or altered file
raises `CheckpointError` naming the file and the step (S107). A checkpoint written before
digests existed (no digest.json, no `digest_file` in its meta.json) loads unverified, with
a one-line warning. Resuming under a different config (or dtype, or target weights) is
refused with a diff.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import safetensors
import safetensors.torch as st
import torch

from contract import checkpoint_digest as cd, checkpoint_meta as cm
from contract.checkpoint_meta import META_FILE, read_meta, target_sha256  # noqa: F401  (public names)
from contract.init import init_state
from contract.resolve import ResolvedRun
from oracle_torch.state import TrainState, make_state

CKPT_SUBDIR = "checkpoints"
FORMAT = "vpd-torch-oracle-checkpoint/1"
STATE_FILE = "state.safetensors"
LEGACY_FILES = (STATE_FILE,)  # what a checkpoint written before digests must hold (besides meta.json)
_STEP_RE = cd.STEP_RE
GROUPS = ("components", "ci_fn")


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.float64: "float64"}.get(dtype, str(dtype))


def _optimizer(state: TrainState, group: str) -> torch.optim.AdamW:
    return state.opt_components if group == "components" else state.opt_ci_fn


def state_tensors(state: TrainState) -> dict[str, torch.Tensor]:
    """The flat tensor dict of a TrainState (what `state.safetensors` holds)."""
    out = {n: p.detach().clone().contiguous() for n, p in state.params.items()}
    for g in GROUPS:
        opt = _optimizer(state, g)
        steps = set()
        step_t = None
        for n in state.group(g + "."):
            st_ = opt.state.get(state.params[n])
            if not st_:
                continue  # never received a gradient: no AdamW state yet
            out[f"opt.{g}.exp_avg.{n}"] = st_["exp_avg"].detach().clone().contiguous()
            out[f"opt.{g}.exp_avg_sq.{n}"] = st_["exp_avg_sq"].detach().clone().contiguous()
            steps.add(float(st_["step"]))
            step_t = st_["step"]
        if len(steps) > 1:
            raise RuntimeError(f"AdamW state of group {g!r} has different step counters {sorted(steps)}")
        if step_t is not None:
            out[f"opt.{g}.step"] = torch.as_tensor(step_t).detach().clone().reshape(())
    # persistent-PGD sources (S82-S84) and their ascent state, per bundle b
    for b, srcs in state.sources.items():
        o = state.source_opt[b]
        for site, t in srcs.items():
            n = f"sources.{b}.{site}"
            out[n] = t.detach().clone().contiguous()
            out[f"opt.sources.exp_avg.{n}"] = o["m"][site].detach().clone().contiguous()
            out[f"opt.sources.exp_avg_sq.{n}"] = o["v"][site].detach().clone().contiguous()
        out[f"opt.sources.{b}.step"] = torch.tensor(int(o["t"]), dtype=torch.int64)
    out["step"] = torch.tensor(state.step, dtype=torch.int64)
    return out


def _versions() -> dict:
    return cm.base_versions() | {"torch": torch.__version__, "safetensors": safetensors.__version__}


_fsync_path = cd.fsync_path


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / CKPT_SUBDIR


def clear_checkpoints(out_dir: str | Path) -> None:
    shutil.rmtree(checkpoint_root(out_dir), ignore_errors=True)


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """The checkpoint dirs (`step_XXXXXXXX`) of a run dir, oldest first, complete or not
    (temp dirs of interrupted saves are ignored): `load_checkpoint` verifies one."""
    return cd.step_dirs(checkpoint_root(out_dir))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (its digest.json present, or one written before
    digests); not verified (`load_checkpoint` does that)."""
    cks = [p for p in list_checkpoints(out_dir) if cd.is_complete(p, LEGACY_FILES)]
    return cks[-1] if cks else None


def verify_checkpoint(path: str | Path) -> bool:
    """Check the checkpoint dir `path` against its digest (CheckpointError naming the file
    otherwise); False for a checkpoint written before digests (loaded unverified)."""
    return cd.verify_checkpoint(path, LEGACY_FILES)


def _clean_stale(root: Path) -> None:
    """Remove temp dirs of interrupted saves. An `.old-step_X-*` dir whose `step_X` is
    missing (a crash between the two renames of a replacement) is put back first."""
    for p in sorted(root.iterdir()):
        if not p.is_dir():
            continue
        if p.name.startswith(".old-"):
            final = root / p.name[len(".old-"):].rsplit("-", 1)[0]
            if _STEP_RE.match(final.name) and not final.exists():
                os.replace(p, final)
                continue
        if p.name.startswith((".tmp-", ".old-")):
            shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(out_dir: str | Path, state: TrainState, run: ResolvedRun, step: int, keep: int,
                    dtype: torch.dtype | None = None, extra: dict | None = None) -> Path:
    """Write `out_dir/checkpoints/step_{step:08d}/` atomically; keep the last `keep`."""
    if state.step != step:
        raise ValueError(f"save_checkpoint: state is at step {state.step}, asked to save it as step {step}")
    if keep < 1:
        raise ValueError("save_checkpoint: keep must be >= 1")
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale(root)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    dtype = dtype or next(iter(state.params.values())).dtype
    meta = cm.build_meta(run, step, _dtype_name(dtype), backend="torch_oracle", fmt=FORMAT, versions=_versions(),
                         extra=extra, param_order=list(state.params))
    try:
        tmp.mkdir()
        st.save_file(state_tensors(state), str(tmp / STATE_FILE),
                     metadata={"format": FORMAT, "step": str(step), "config_hash": meta["config_hash"]})
        (tmp / META_FILE).write_text(cm.meta_json(meta))
        for f in (STATE_FILE, META_FILE):
            _fsync_path(tmp / f)
        cd.write_digest(tmp, step)  # last: fsyncs itself and the dir
        if final.exists():  # same step written again (e.g. a fresh run over an old dir)
            old = root / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_path(root, directory=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for p in list_checkpoints(out_dir)[:-keep]:  # damaged or incomplete dirs rotate out like the others
        if p != final:
            shutil.rmtree(p, ignore_errors=True)
    return final


def check_compatible(meta: dict, run: ResolvedRun, dtype: torch.dtype, path: Path) -> None:
    """Refuse a resume under another config, dtype or target (ConfigError with a diff; S94)."""
    cm.check_compatible(meta, run, _dtype_name(dtype), path)


def load_checkpoint(path: str | Path, run: ResolvedRun, dtype: torch.dtype) -> TrainState:
    """Restore params, both AdamW states (moments and step counters), the persistent-PGD
    sources and their ascent state, and state.step exactly. The files are verified against
    the digest first (CheckpointError naming the file and the step)."""
    path = Path(path)
    verify_checkpoint(path)
    meta = read_meta(path)
    cm.check_format(meta, FORMAT, path)
    check_compatible(meta, run, dtype, path)
    try:
        tensors = st.load_file(str(path / STATE_FILE))
    except (safetensors.SafetensorError, OSError, ValueError) as e:  # reachable for an unverified (legacy) one
        raise cd.unreadable(path, STATE_FILE, e) from e
    expected = init_state(run)  # canonical names, order and shapes
    names = list(expected)
    have = {n for n in tensors if not n.startswith("opt.") and n != "step"}
    missing, unexpected = sorted(set(names) - have), sorted(have - set(names))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path}: parameters do not match the run: missing {missing}, unexpected {unexpected}")
    bad = [f"{n}: {tuple(tensors[n].shape)} vs {expected[n].shape}" for n in names if tuple(tensors[n].shape) != expected[n].shape]
    if bad:
        raise ValueError(f"checkpoint {path}: parameter shapes differ from the run: " + "; ".join(bad))
    for n in names:
        if tensors[n].dtype != dtype:
            raise ValueError(f"checkpoint {path}: {n} is {tensors[n].dtype}, expected {dtype}")
    state = make_state(run, {n: tensors[n].numpy() for n in names}, dtype)
    for g in GROUPS:
        opt = _optimizer(state, g)
        sd = opt.state_dict()
        group_names = state.group(g + ".")
        assert len(sd["param_groups"]) == 1 and len(sd["param_groups"][0]["params"]) == len(group_names)
        new_state = {}
        for i, n in enumerate(group_names):
            k1, k2 = f"opt.{g}.exp_avg.{n}", f"opt.{g}.exp_avg_sq.{n}"
            if k1 not in tensors:
                continue
            new_state[i] = {"step": tensors[f"opt.{g}.step"].clone(), "exp_avg": tensors[k1].clone(),
                            "exp_avg_sq": tensors[k2].clone()}
        sd["state"] = new_state
        opt.load_state_dict(sd)
    for b, srcs in state.sources.items():
        o = state.source_opt[b]
        for site in srcs:
            n = f"sources.{b}.{site}"
            o["m"][site] = tensors[f"opt.sources.exp_avg.{n}"].clone()
            o["v"][site] = tensors[f"opt.sources.exp_avg_sq.{n}"].clone()
        o["t"] = int(tensors[f"opt.sources.{b}.step"])
    state.step = int(tensors["step"])
    if state.step != meta["step"]:
        raise ValueError(f"checkpoint {path}: meta.json says step {meta['step']}, the state holds {state.step}")
    return state
