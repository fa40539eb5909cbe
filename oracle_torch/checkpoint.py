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

On N data ranks (S111) the same tensors are saved sharded through torch.distributed.checkpoint
(oracle_torch/sharded_checkpoint.py, format `DCP_FORMAT`); `load_checkpoint` reads either
format on any number of ranks (one-process checkpoints load sharded, sharded ones whole).

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
from oracle_torch import sharded_checkpoint as sc
from oracle_torch.ranks import ONE, Ranks
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
    """The flat tensor dict of a TrainState (what `state.safetensors` holds). On N ranks the
    sharded leaves are DTensors of the global tensors (S111)."""
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
            out[n] = _rows(state, b, t.detach().clone().contiguous())
            out[f"opt.sources.exp_avg.{n}"] = _rows(state, b, o["m"][site].detach().clone().contiguous())
            out[f"opt.sources.exp_avg_sq.{n}"] = _rows(state, b, o["v"][site].detach().clone().contiguous())
        out[f"opt.sources.{b}.step"] = torch.tensor(int(o["t"]), dtype=torch.int64)
    out["step"] = torch.tensor(state.step, dtype=torch.int64)
    return out


def _rows(state: TrainState, bundle: str, t: torch.Tensor) -> torch.Tensor:
    """A bundle's tensor as the global one: on N ranks a per-position one is this rank's rows."""
    if bundle not in state.row_sharded:
        return t
    return sc.rows_dtensor(t, state.mesh)


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
    dtype = dtype or next(iter(state.params.values())).dtype
    if state.ranks.sharded:
        final = _save_sharded(out_dir, state, run, step, dtype, extra)
    else:
        final = _save_whole(out_dir, state, run, step, dtype, extra)
    if state.ranks.primary:
        for p in list_checkpoints(out_dir)[:-keep]:  # damaged or incomplete dirs rotate out like the others
            if p != final:
                shutil.rmtree(p, ignore_errors=True)
    state.ranks.barrier()
    return final


def _meta(state: TrainState, run: ResolvedRun, step: int, dtype: torch.dtype, extra: dict | None, fmt: str,
          **more) -> dict:
    return cm.build_meta(run, step, _dtype_name(dtype), backend="torch_oracle", fmt=fmt, versions=_versions(),
                         extra=extra, param_order=list(state.params), **more)


def _save_sharded(out_dir: str | Path, state: TrainState, run: ResolvedRun, step: int, dtype: torch.dtype,
                  extra: dict | None) -> Path:
    """S111: every rank writes its shards (DCP) into one temp dir; rank 0 then writes meta and
    digest and renames it into place."""
    ranks = state.ranks
    root = checkpoint_root(out_dir)
    final = root / f"step_{step:08d}"
    tmp = sc.tmp_dir(final)
    if ranks.primary:
        root.mkdir(parents=True, exist_ok=True)
        _clean_stale(root)
        tmp.mkdir()
    ranks.barrier()
    try:
        sc.write_shards(tmp, state_tensors(state))  # collective; raises on every rank if one fails
        ranks.barrier()
        if ranks.primary:
            meta = _meta(state, run, step, dtype, extra, sc.DCP_FORMAT, world_size=ranks.world)
            (tmp / META_FILE).write_text(cm.meta_json(meta))
            for f in sc.files_of(tmp):
                _fsync_path(f)
            cd.write_digest(tmp, step)  # last: fsyncs itself and the dir
            sc.publish(tmp, final)
            _fsync_path(root, directory=True)
    except BaseException:
        if ranks.primary:
            sc.clear(tmp)
        raise
    return final


def _save_whole(out_dir: str | Path, state: TrainState, run: ResolvedRun, step: int, dtype: torch.dtype,
                extra: dict | None) -> Path:
    """The one-process format: one safetensors file."""
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale(root)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    meta = _meta(state, run, step, dtype, extra, FORMAT)
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
    return final


def check_compatible(meta: dict, run: ResolvedRun, dtype: torch.dtype, path: Path) -> None:
    """Refuse a resume under another config, dtype or target (ConfigError with a diff; S94)."""
    cm.check_compatible(meta, run, _dtype_name(dtype), path)


def load_checkpoint(path: str | Path, run: ResolvedRun, dtype: torch.dtype, ranks: Ranks = ONE) -> TrainState:
    """Restore params, both AdamW states (moments and step counters), the persistent-PGD
    sources and their ascent state, and state.step exactly, on `ranks` (S111: either format
    on any number of ranks). The files are verified against the digest first
    (CheckpointError naming the file and the step)."""
    path = Path(path)
    verify_checkpoint(path)
    meta = read_meta(path)
    sharded = meta.get("format") == sc.DCP_FORMAT
    if not sharded:
        cm.check_format(meta, FORMAT, path)
    check_compatible(meta, run, dtype, path)
    if ranks.sharded:
        return _load_sharded(path, meta, run, dtype, ranks, sharded)
    tensors = sc.read_whole(path) if sharded else _read_safetensors(path)
    _check_params(path, run, dtype, tensors)
    names = list(init_state(run))
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


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return st.load_file(str(path / STATE_FILE))
    except (safetensors.SafetensorError, OSError, ValueError) as e:  # reachable for an unverified (legacy) one
        raise cd.unreadable(path, STATE_FILE, e) from e


def _check_params(path: Path, run: ResolvedRun, dtype: torch.dtype, tensors: dict) -> None:
    """The checkpoint's parameters are the run's: names, global shapes, dtype."""
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


def _load_sharded(path: Path, meta: dict, run: ResolvedRun, dtype: torch.dtype, ranks: Ranks,
                  sharded: bool) -> TrainState:
    """S111 on N ranks: a fresh sharded state is the template; every tensor of the checkpoint
    lands in this rank's layout (a sharded checkpoint: DCP reads this rank's shards; a
    one-process one: read whole, then this rank's shard taken)."""
    state = make_state(run, None, dtype, ranks)
    template = _template(state, sc.saved_tensors(path) if sharded else None, path)
    if sharded:
        tensors = sc.read_into(path, template)
    else:
        whole = _read_safetensors(path)
        _check_params(path, run, dtype, whole)
        missing = sorted(set(template) - set(whole))
        if missing:
            raise ValueError(f"checkpoint {path}: {STATE_FILE} lacks {', '.join(missing[:5])}")
        tensors = {n: sc.like(t, whole[n]) for n, t in template.items()}
    with torch.no_grad():
        for n, p in state.params.items():
            sc.local(p).copy_(sc.local(tensors[n]))
    for g in GROUPS:
        opt = _optimizer(state, g)
        for n in state.group(g + "."):
            if f"opt.{g}.exp_avg.{n}" in tensors:
                opt.state[state.params[n]] = {"step": tensors[f"opt.{g}.step"].clone(),
                                              "exp_avg": tensors[f"opt.{g}.exp_avg.{n}"],
                                              "exp_avg_sq": tensors[f"opt.{g}.exp_avg_sq.{n}"]}
    for b, srcs in state.sources.items():
        o = state.source_opt[b]
        for site in srcs:
            n = f"sources.{b}.{site}"
            srcs[site] = sc.unwrap(tensors[n])
            o["m"][site] = sc.unwrap(tensors[f"opt.sources.exp_avg.{n}"])
            o["v"][site] = sc.unwrap(tensors[f"opt.sources.exp_avg_sq.{n}"])
        o["t"] = int(tensors[f"opt.sources.{b}.step"])
    state.step = int(tensors["step"])
    if state.step != meta["step"]:
        raise ValueError(f"checkpoint {path}: meta.json says step {meta['step']}, the state holds {state.step}")
    return state


def _template(state: TrainState, saved: dict | None, path: Path) -> dict[str, torch.Tensor]:
    """The tensors to read, laid out as this rank holds them: the fresh state's own tensors,
    and for AdamW moments (absent from a fresh optimizer) zeros shaped like their parameter.
    `saved` (a sharded checkpoint's tensor metadata) decides which moments exist; None =
    every parameter's (a one-process checkpoint: checked when read)."""
    out = state_tensors(state)
    for g in GROUPS:
        for n in state.group(g + "."):
            k = f"opt.{g}.exp_avg.{n}"
            if saved is None or k in saved:
                p = state.params[n].detach()
                out[k], out[f"opt.{g}.exp_avg_sq.{n}"] = torch.zeros_like(p), torch.zeros_like(p)
                k_step = f"opt.{g}.step"
                out[k_step] = torch.zeros((), dtype=saved[k_step].properties.dtype if saved else torch.float32)
    if saved is not None:
        missing = sorted(set(out) - set(saved))
        if missing:
            raise ValueError(f"checkpoint {path}: the sharded state lacks {', '.join(missing[:5])}")
        for n, t in out.items():
            if tuple(t.shape) != tuple(saved[n].size):
                raise ValueError(f"checkpoint {path}: {n} is {tuple(saved[n].size)}, the run's is {tuple(t.shape)}")
            if saved[n].properties.dtype != t.dtype and not n.endswith(".step") and n != "step":
                raise ValueError(f"checkpoint {path}: {n} is {saved[n].properties.dtype}, expected {t.dtype}")
    return out
