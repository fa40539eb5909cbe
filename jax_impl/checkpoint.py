"""Checkpoints of the JAX trainer. Mirror of oracle_torch/checkpoint.py (same function names,
same directory naming, same refusal rules).

Layout: `out_dir/checkpoints/step_{step:08d}/`, written by an orbax `CheckpointManager`
(`max_to_keep = cfg.checkpoint.keep`; damaged dirs count and rotate out like the others).
orbax writes into a temporary directory and renames it on commit. Each checkpoint holds two
items:

- `state`: the whole training-state pytree — params, both optax AdamW states (injected
  hyper-parameters, counts, moments) and `step` — restored against an abstract tree built
  from the run (`abstract_state`), so dtypes and structure come back exactly;
- `meta` (also copied to a plain `meta.json` in the step dir, written atomically after the
  commit, for tools that do not use orbax): JSON with the step, the resolved config (`cfg.to_dict()`) and its hash, the dtype,
  the sha256 of the target weights, library versions, date and `extra` (training notes such
  as the faithfulness-warmup losses);

and, written last, `digest.json` (contract/checkpoint_digest.py, shared with the oracle):
size and sha256 of every file of the directory, orbax's and meta.json. It is the commit
marker: a step dir without it (a kill between orbax's commit and the marker) is an
incomplete save, never loaded. A load verifies the digest before orbax reads anything; a
missing, truncated or altered file raises `CheckpointError` naming the file and the step
(S107). A checkpoint written before digests (no digest.json, no `digest_file` in its
meta.json, orbax's `state` item present) loads unverified, with a one-line warning.

The meta dict and the refusal of a resume under a different config, dtype or target (a
field-by-field diff) are shared with the oracle (`contract/checkpoint_meta.py`). Saves are synchronous: the training step donates its state
buffers, so an asynchronous writer could read a buffer the next step already reused.

Sharded state (S145): the state is saved as the global arrays of its mesh, each process
writing only the shards of its own devices; `meta` records the mesh it was written on
(`mesh`: data, components, processes, devices). A load restores onto the mesh of the loading
run (`shardings`, from `jax_impl/mesh.py`): orbax reads each device's slice of every leaf,
so a checkpoint of one mesh resumes on any other (1 -> (2,2), (2,2) -> (4,1), 2 processes ->
1) -- the mesh is not part of the compared config (contract/checkpoint_meta.py `computed`).
A state the loading mesh cannot lay out is refused before anything is read, naming the leaf,
its size and the axis size. With several processes, process 0 alone deletes, writes
meta.json and the digest, and every process waits for it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from contract import checkpoint_digest as cd, checkpoint_meta as cm
from contract.checkpoint_meta import META_FILE, target_sha256  # noqa: F401  (public names)
from contract.config import ConfigError, parse_config
from contract.resolve import ResolvedRun, resolve_run
from jax_impl.mesh import check_layout
from jax_impl.state import TrainState, abstract_tree
from jax_impl.train import prng_impl

CKPT_SUBDIR = "checkpoints"
FORMAT = "vpd-jax-checkpoint/1"
_STEP_RE = cd.STEP_RE
ITEMS = ("state", "meta")
# what a checkpoint written before digests must hold besides meta.json (copied there after
# orbax's commit, so its presence means the commit happened)
LEGACY_FILES = ("state",)


def _dtype_name(dtype) -> str:
    return str(np.dtype(dtype))


def _versions() -> dict:
    from importlib.metadata import version

    import optax
    # jaxlib does not export __version__ to type checkers; its distribution metadata is the same string
    out = cm.base_versions() | {"jax": jax.__version__, "jaxlib": version("jaxlib"), "optax": optax.__version__}
    try:
        out["orbax-checkpoint"] = version("orbax-checkpoint")
    except Exception:  # pragma: no cover - metadata missing in odd installs
        pass
    return out


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / CKPT_SUBDIR


def make_manager(out_dir: str | Path, keep: int | None = None, read_only: bool = False) -> ocp.CheckpointManager:
    """The orbax manager of `out_dir/checkpoints` (synchronous, atomic, `step_XXXXXXXX` dirs).
    `read_only` managers are only used to list and restore (orbax's own read_only mode is
    not used: it only adds log noise)."""
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                        step_prefix="step", step_format_fixed_length=8,
                                        enable_async_checkpointing=False)
    return ocp.CheckpointManager(checkpoint_root(out_dir).resolve(), options=opts, item_names=ITEMS)


def _step_path(out_dir: str | Path, step: int) -> Path:
    return checkpoint_root(out_dir) / f"step_{step:08d}"


def _split(path: str | Path) -> tuple[Path, int]:
    """checkpoint dir `.../checkpoints/step_XXXXXXXX` -> (run out_dir, step)."""
    path = Path(path)
    m = _STEP_RE.match(path.name)
    if not m or path.parent.name != CKPT_SUBDIR:
        raise FileNotFoundError(f"{path} is not a checkpoint directory (expected .../{CKPT_SUBDIR}/step_XXXXXXXX)")
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} not found")
    return path.parent.parent, int(m.group(1))


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """The checkpoint dirs (`step_XXXXXXXX`) of a run dir, oldest first, complete or not
    (orbax temp dirs are ignored): `load_checkpoint` verifies one."""
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


def save_checkpoint(out_dir: str | Path, state: TrainState, run: ResolvedRun, step: int, keep: int, dtype=None,
                    extra: dict | None = None, manager: ocp.CheckpointManager | None = None) -> Path:
    """Write `out_dir/checkpoints/step_{step:08d}/` atomically; keep the last `keep`.
    Pass a long-lived `manager` (from `make_manager(out_dir, keep)`) to save repeatedly."""
    have = int(jax.device_get(state.step))
    if have != step:
        raise ValueError(f"save_checkpoint: state is at step {have}, asked to save it as step {step}")
    if keep < 1:
        raise ValueError("save_checkpoint: keep must be >= 1")
    dtype = dtype or next(iter(state.params.values())).dtype
    meta = cm.build_meta(run, step, _dtype_name(dtype), backend="jax", fmt=FORMAT, versions=_versions(), extra=extra,
                         prng_impl=production_prng_impl(run), param_order=list(state.params), mesh=written_mesh(run))
    mngr = manager or make_manager(out_dir, keep)
    path = _step_path(out_dir, step)
    primary = jax.process_index() == 0
    try:
        if step in mngr.all_steps():  # same step written again (e.g. a fresh run over an old dir, a damaged one)
            mngr.delete(step)
        if primary and path.exists():  # a damaged dir orbax does not take for a step
            shutil.rmtree(path)
        sync(f"vpd-save-clear-{step}")
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state.to_tree()), meta=ocp.args.JsonSave(meta)),
                  force=True)
        mngr.wait_until_finished()
    finally:
        if manager is None:
            mngr.close()
    # a plain meta.json copy of the meta item beside orbax's items (for the loader's checks
    # and for tools that read a checkpoint without orbax), then the commit marker, each
    # written via temp file + rename
    if primary:
        cd.write_text_atomic(path / META_FILE, cm.meta_json(meta))
        cd.write_digest(path, step)
    sync(f"vpd-save-digest-{step}")
    return path


def sync(name: str) -> None:
    """Every process of the run reaches this point (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def written_mesh(run: ResolvedRun) -> dict:
    """The mesh a checkpoint is written on (S145): its axis sizes, processes and devices."""
    m = run.cfg.runtime.mesh
    return {"data": m.data, "components": m.components, "processes": jax.process_count(),
            "devices": m.data * m.components}


def read_meta(path: str | Path) -> dict:
    out_dir, step = _split(path)
    mngr = make_manager(out_dir, read_only=True)
    try:
        return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
    finally:
        mngr.close()


def check_compatible(meta: dict, run: ResolvedRun, dtype, path: Path) -> None:
    """Refuse a resume under another config, dtype or target (ConfigError with a diff; S94), or
    under another production generator."""
    cm.check_compatible(meta, run, _dtype_name(dtype), path)
    # S50: the production draws of the remaining steps come from this generator; a checkpoint
    # without the field predates Philox and drew with threefry
    have, want = meta.get("prng_impl", "threefry2x32"), production_prng_impl(run)
    if have != want:
        raise ConfigError(f"cannot resume from {path}: its run drew with the {have} generator, this trainer draws "
                          f"with {want}, so the resumed run would not reproduce it; start afresh (--no-resume / another --out)")


def production_prng_impl(run: ResolvedRun) -> str:
    del run  # one generator on every mesh (S143)
    return prng_impl()


def abstract_state(run: ResolvedRun, dtype, shardings: dict | None = None) -> dict:
    """Shapes, dtypes, shardings and pytree structure of the stored training-state tree of
    `run` (`TrainState.to_tree()`; nothing allocated). `shardings` (a tree of the same
    structure, the loading run's mesh layout) defaults to the first device."""
    tree = abstract_tree(run, dtype)
    if shardings is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, tree)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)


def check_mesh(meta: dict, run: ResolvedRun, dtype, path: Path) -> None:
    """S145: refuse, before reading anything, a checkpoint whose state the loading run's mesh
    cannot lay out (ValueError naming the checkpoint's mesh, the leaf and the sizes)."""
    m = run.cfg.runtime.mesh
    try:
        check_layout(run, abstract_tree(run, dtype), m.data, m.components)
    except ValueError as e:
        w = meta.get("mesh") or {"data": 1, "components": 1}
        raise ValueError(f"{e} (checkpoint {path} was written on data {w.get('data')} x components "
                         f"{w.get('components')})") from None


def load_checkpoint(path: str | Path, run: ResolvedRun, dtype, shardings: dict | None = None) -> TrainState:
    """Restore the whole training state (params, both optax states, step) exactly, laid out by
    `shardings` (the loading run's mesh; default one device). The files are verified against
    the digest first (CheckpointError naming the file and the step)."""
    path = Path(path)
    out_dir, step = _split(path)
    verify_checkpoint(path)
    meta = cm.read_meta(path)  # the plain copy of the meta item, verified with the rest
    cm.check_format(meta, FORMAT, path)
    check_compatible(meta, run, dtype, path)
    check_mesh(meta, run, dtype, path)
    target = abstract_state(run, dtype, shardings)
    mngr = make_manager(out_dir, read_only=True)
    try:
        state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types; reachable for an unverified (legacy) one
        raise cd.unreadable(path, "orbax item 'state'", e) from e
    finally:
        mngr.close()
    if jax.tree.structure(state) != jax.tree.structure(target):
        raise ValueError(f"checkpoint {path}: the stored state's structure differs from the run's")
    bad = [f"{jax.tree_util.keystr(k)}: {a.shape}/{a.dtype} vs {t.shape}/{t.dtype}"
           for (k, a), t in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(target), strict=True)
           if a.shape != t.shape or a.dtype != t.dtype]
    if bad:
        raise ValueError(f"checkpoint {path}: restored leaves differ from the run: " + "; ".join(bad))
    if int(state["step"]) != meta["step"]:
        raise ValueError(f"checkpoint {path}: meta says step {meta['step']}, the state holds {int(state['step'])}")
    return TrainState.from_tree(state)


def load_run_checkpoint(path: str | Path, dtype=None) -> tuple[TrainState, dict, ResolvedRun]:
    """(state, meta, run) of a checkpoint dir, or of the newest checkpoint of a run dir; the run
    is rebuilt from the config stored in the checkpoint, dtype defaults to the stored one."""
    path = Path(path)
    if not _STEP_RE.match(path.name):
        ck = latest_checkpoint(path)
        if ck is None:
            raise FileNotFoundError(f"no checkpoint under {checkpoint_root(path)}")
        path = ck
    meta = read_meta(path)
    run = resolve_run(parse_config(meta["config"], f"config stored in {path}"))
    dtype = np.dtype(meta["dtype"]) if dtype is None else dtype
    return load_checkpoint(path, run, dtype), meta, run


def clear_checkpoints(out_dir: str | Path) -> None:
    if jax.process_index() == 0:  # S145: process 0 alone deletes; the others wait for it
        shutil.rmtree(checkpoint_root(out_dir), ignore_errors=True)
    sync("vpd-clear-checkpoints")
