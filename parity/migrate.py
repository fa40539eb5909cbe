"""Migrate a checkpoint between the frameworks (SPEC S130-S132).

    python -m parity.migrate SRC_CHECKPOINT --to jax|torch --out DST_RUN_DIR [--mesh-data N]

SRC_CHECKPOINT is a checkpoint directory (`RUN/checkpoints/step_XXXXXXXX`) of the oracle
(one-process safetensors, or the sharded DCP format it writes on N ranks) or of the JAX
trainer (orbax). DST_RUN_DIR must not exist (or be
an empty directory); it becomes a run directory of the destination backend — `run.json`
(S104), `checkpoints/step_XXXXXXXX` in that backend's own layout and naming, written by its
own `save_checkpoint` (meta.json, digest.json), and the source run's `metrics.jsonl` lines
before the step (S101) — so the destination trainer started on DST_RUN_DIR with the same
config resumes from it:

    python -m jax_impl.cli train CONFIG --out DST_RUN_DIR

The destination's mesh: `--mesh-data N` (default: the source's `runtime.mesh.data`) sets
`runtime.mesh.data` of the destination's stored config (the only field that may change: a
checkpoint resumes on another mesh, S111) and so its format — `--to torch` writes the
oracle's one-process format for N = 1 and its sharded format (DCP, `meta.json`
`world_size` N) for N > 1, written whole from this one process (`__0_0.distcp`; DCP
reshards it onto the N ranks that resume it); `--to jax` writes orbax either way, with the
production generator of that mesh (S50). Between the oracle's two formats (`--to torch`
from an oracle checkpoint, with a `--mesh-data` that changes the format) the copy is the
identity, leaf for leaf.

The copy is pure: every leaf goes through one link of parity/migrate_map.py (the layout
table's transform for tensors, exact integer casts for counters; nothing is recomputed from
the data): components, CI-function parameters, both AdamW groups' moments and step counters,
every persistent-PGD bundle's sources with their ascent moments and counter, the step, the
resolved config, `extra` (the faithfulness-warmup notes, skipped steps) plus
`extra.migrated_from` (the source's backend, format, step, path, config hash and
generator). Before anything is committed the new checkpoint is loaded back by the
destination's own loader (digest, format, config, structure and dtypes) and verified against
the source by parity/verify.py, leaf by leaf; only then is the temp directory renamed to
DST_RUN_DIR. A refusal — a missing leaf, a wrong dtype or shape, a damaged or truncated file,
an unknown format, a config the destination refuses, a changed target weight file — is one
error naming the leaf, file or field (exit 2; 5 for a damaged checkpoint); the source is
only read, and nothing is left at DST_RUN_DIR.

A continued run reproduces the source's own continuation only when both draw from the
contract's plan (`runtime.draws: contract`, S131): under `device` the destination draws
with its own generator (a warning says so)."""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np

from contract.checkpoint_digest import file_sha256
from contract.checkpoint_meta import computed
from contract.config import ConfigError, parse_config
from contract.errors import EXIT_INPUT, VPDError
from contract.layout import jax_to_torch, torch_to_jax
from contract.resolve import ResolvedRun, resolve_run
from contract.runlog import one_line, read_metric_lines
from contract.targets import resolve_path
from parity.migrate_io import (
    JAX_FORMAT,
    ORACLE_DCP_FORMAT,
    ORACLE_FORMAT,
    CheckpointReader,
    open_checkpoint,
    read_meta_json,
)
from parity.migrate_map import (
    BACKENDS,
    JAX,
    JAX_COUNT_DTYPE,
    OPT_GROUPS,
    TORCH,
    Link,
    MigrationError,
    build_links,
    coverage,
    generator_of,
    torch_opt_groups_of,
)
from parity.verify import MIGRATED_FROM

PROG = "parity.migrate"


def _warn(msg: str) -> None:
    print(f"{PROG}: warning: {msg}", file=sys.stderr, flush=True)


def source_run(reader: CheckpointReader) -> tuple[ResolvedRun, int, str]:
    """(run, step, dtype name) of a checkpoint, from its meta.json, with the refusals a
    trainer would make on resume (config, target weights)."""
    meta, where = reader.meta, reader.path / "meta.json"
    for field in ("config", "step", "dtype", "config_hash"):
        if field not in meta:
            raise MigrationError(f"{where}: field {field!r} missing")
    step, dtype = meta["step"], meta["dtype"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise MigrationError(f"{where}: field 'step' is {step!r}, not a step")
    if dtype not in ("float32", "float64"):
        raise MigrationError(f"{where}: field 'dtype' is {dtype!r} (a checkpoint state is float32 or float64)")
    try:
        run = resolve_run(parse_config(copy.deepcopy(meta["config"]), f"config stored in {where}"))
    except ConfigError as e:
        raise MigrationError(str(e)) from e
    if run.cfg.to_dict() != meta["config"] or run.cfg.hash() != meta["config_hash"]:
        raise MigrationError(f"{where}: field 'config_hash' {meta['config_hash']!r} does not match its config "
                             f"(re-resolved: {run.cfg.hash()}); the checkpoint's metadata is inconsistent")
    sha = meta.get("target_sha256")
    if sha is not None:
        now = file_sha256(resolve_path(run.cfg.target.weights))
        if now != sha:
            raise MigrationError(f"{where}: target weights {run.cfg.target.weights} changed since the checkpoint was "
                                 f"written (sha256 {sha[:12]}… -> {now[:12]}…); the destination would resume on other weights")
    return run, step, dtype


def dest_run(run: ResolvedRun, mesh_data: int | None) -> ResolvedRun:
    """The destination's run: the source's, with `runtime.mesh.data` set to `mesh_data`
    (None: unchanged). A mesh the config refuses (e.g. not dividing batch_size) is refused."""
    if mesh_data is None or mesh_data == run.cfg.runtime.mesh.data:
        return run
    if isinstance(mesh_data, bool) or not isinstance(mesh_data, int) or mesh_data < 1:
        raise MigrationError(f"--mesh-data: {mesh_data!r} is not a number of ranks (an integer >= 1)")
    d = run.cfg.to_dict()
    d["runtime"] = dict(d.get("runtime") or {})
    d["runtime"]["mesh"] = dict(d["runtime"].get("mesh") or {}, data=mesh_data)
    try:
        out = resolve_run(parse_config(d, f"the destination's config (--mesh-data {mesh_data})"))
    except ConfigError as e:
        raise MigrationError(f"--mesh-data {mesh_data}: {e}") from e
    if computed(out.cfg.to_dict()) != computed(run.cfg.to_dict()):  # only where the run runs may change
        raise MigrationError(f"--mesh-data {mesh_data}: the config changed beyond runtime.mesh (a bug)")
    return out


def dest_format(to: str, run: ResolvedRun) -> str:
    """The checkpoint format the destination trainer writes for `run`."""
    if to == JAX:
        return JAX_FORMAT
    return ORACLE_DCP_FORMAT if run.cfg.runtime.mesh.data > 1 else ORACLE_FORMAT


def _jax_opt_groups(reader: CheckpointReader) -> frozenset[str]:
    """The AdamW groups of a JAX checkpoint that have taken an update (count > 0): the
    oracle holds AdamW state for exactly those."""
    out = set()
    leaves = reader.leaves()
    for g in OPT_GROUPS:
        leaf = f"opt_{g}/inner_state/0/count"
        if leaf not in leaves:
            raise MigrationError(f"{reader.path}: leaf {leaf!r} missing (the AdamW count of group {g})")
        if int(reader.load(leaf)) > 0:
            out.add(g)
    return frozenset(out)


def source_links(reader: CheckpointReader, run: ResolvedRun, step: int, dtype: str) -> list[Link]:
    """The links of the source checkpoint, after checking that its leaves are exactly the
    ones they name, each with its dtype and shape (MigrationError naming the leaf)."""
    groups = torch_opt_groups_of(reader.leaves()) if reader.family == TORCH else _jax_opt_groups(reader)
    links = build_links(run, step, dtype, groups)
    info = reader.leaves()
    missing, unclaimed = coverage(links, reader.family, info)
    if missing:
        g, leaf = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MigrationError(f"checkpoint {reader.path}: leaf {leaf!r} ({g}) missing{more}")
    if unclaimed:
        g, leaf = unclaimed[0]
        raise MigrationError(f"checkpoint {reader.path}: leaf {leaf!r} is not part of this run's state "
                             f"(the migration table names no such {reader.family} leaf)")
    for lk in links:
        names = [lk.torch] if reader.family == TORCH else list(lk.jax)
        want_dtype = lk.torch_dtype if reader.family == TORCH else lk.jax_dtype
        want_shape = lk.shape if reader.family == TORCH else lk.jax_shape()
        for leaf in names:
            if leaf is None:
                continue
            li = info[leaf]
            if want_dtype is not None and li.dtype != want_dtype:
                raise MigrationError(f"checkpoint {reader.path}: leaf {leaf!r} is {li.dtype}, expected {want_dtype}"
                                     + (" (the state's dtype, meta.json 'dtype')" if lk.kind == "tensor" else ""))
            if want_dtype is None and li.dtype not in ("float32", "float64"):
                raise MigrationError(f"checkpoint {reader.path}: leaf {leaf!r} is {li.dtype}, expected a float")
            if tuple(li.shape) != tuple(want_shape):
                raise MigrationError(f"checkpoint {reader.path}: leaf {leaf!r} has shape {list(li.shape)}, "
                                     f"the run's is {list(want_shape)}")
    return links


def _count(reader: CheckpointReader, leaf: str) -> int:
    v = reader.load(leaf)
    f = float(v)
    if f != int(f) or f < 0:
        raise MigrationError(f"checkpoint {reader.path}: counter {leaf!r} holds {f!r}, not a count")
    return int(f)


def translate(reader: CheckpointReader, links: list[Link], to: str) -> dict[str, np.ndarray]:
    """{destination leaf: array}: every source leaf through its link (the layout table's
    transform; counters cast exactly; JAX-only leaves from the table); between the oracle's
    two formats (same family) every leaf as it is."""
    out: dict[str, np.ndarray] = {}
    if reader.family == to:
        for lk in links:
            if lk.torch is None:
                continue
            if lk.kind == "counter":
                _count(reader, lk.torch)  # a count, or refused naming it
            out[lk.torch] = reader.load(lk.torch)
        return out
    if reader.family == TORCH:
        for lk in links:
            if lk.kind == "tensor":
                assert lk.torch is not None
                out[lk.jax[0]] = np.ascontiguousarray(torch_to_jax(lk.name, reader.load(lk.torch)))
            elif lk.kind == "counter":
                assert lk.torch is not None
                n = _count(reader, lk.torch)
                for leaf in lk.jax:
                    out[leaf] = np.asarray(n, dtype=JAX_COUNT_DTYPE)
            elif lk.kind == "zeros":
                for leaf in lk.jax:
                    out[leaf] = np.zeros(lk.jax_shape(), dtype=lk.jax_dtype)
            else:  # hyper: the value the config gives, cast to the destination's dtype when written
                out[lk.jax[0]] = np.asarray(lk.value)
        return out
    for lk in links:
        if lk.kind == "tensor":
            assert lk.torch is not None
            out[lk.torch] = np.ascontiguousarray(jax_to_torch(lk.name, reader.load(lk.jax[0])))
        elif lk.kind == "counter":
            assert lk.torch is not None
            vals = {leaf: _count(reader, leaf) for leaf in lk.jax}
            if len(set(vals.values())) > 1:
                raise MigrationError(f"checkpoint {reader.path}: the counts {vals} of one optimizer disagree")
            out[lk.torch] = np.asarray(next(iter(vals.values())), dtype=lk.torch_dtype)
        elif lk.kind == "zeros":
            for leaf in lk.jax:
                if np.count_nonzero(reader.load(leaf)):
                    raise MigrationError(f"checkpoint {reader.path}: leaf {leaf!r} is nonzero while its optimizer "
                                         "has taken no update (count 0)")
        # hyper: the oracle takes them from the config (checked against it by the verifier)
    return out


def _state_arrays(links: list[Link], values: dict[str, np.ndarray], side: str) -> dict[str, np.ndarray]:
    """{flat name: array} of the parameters and sources (contract/init.py names) for a
    backend's `make_state`, in the destination's layout."""
    return {lk.name: values[lk.torch if side == TORCH else lk.jax[0]]  # type: ignore[index]
            for lk in links if lk.kind == "tensor" and (lk.name.startswith(("components.", "ci_fn.", "sources.")))}


def _write_jax(run: ResolvedRun, step: int, links: list[Link], values: dict[str, np.ndarray], out: Path, extra: dict) -> Path:
    import jax

    if run.cfg.runtime.dtype == "float64":  # as the JAX CLI does, before JAX computes (loop/cli.py)
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from jax_impl import checkpoint as jck
    from jax_impl.state import TrainState, jax_dtype, make_state

    try:
        dt = jax_dtype(run.cfg.runtime.dtype)
        state = make_state(run, _state_arrays(links, values, JAX), dt)  # the destination's own structure
    except ValueError as e:
        raise MigrationError(f"the JAX trainer refuses this run: {e}") from e
    flat, treedef = jax.tree_util.tree_flatten_with_path(state.to_tree())
    used, new = set(), []
    for kp, x in flat:
        leaf = "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in kp)
        if leaf not in values:
            raise MigrationError(f"migration table: the JAX state leaf {leaf!r} has no link (a bug: extend parity/migrate_map.py)")
        v = values[leaf]
        used.add(leaf)
        if v.shape != x.shape:
            raise MigrationError(f"JAX leaf {leaf!r}: migrated shape {list(v.shape)}, the JAX trainer's {list(x.shape)}")
        if v.dtype != x.dtype and leaf.split("/")[-2:-1] != ["hyperparams"]:
            raise MigrationError(f"JAX leaf {leaf!r}: migrated dtype {v.dtype}, the JAX trainer's {x.dtype}")
        new.append(jnp.asarray(v, dtype=x.dtype))
    unused = sorted(set(values) - used)
    if unused:
        raise MigrationError(f"migration table: leaves {unused[:3]} are not in the JAX trainer's state (a bug)")
    state = TrainState.from_tree(jax.tree_util.tree_unflatten(treedef, new))
    path = jck.save_checkpoint(out, state, run, step, run.cfg.checkpoint.keep, dt, extra)
    jck.load_checkpoint(path, run, dt)  # the destination's own loader accepts it (digest, format, config, structure)
    return path


def _write_torch(run: ResolvedRun, step: int, links: list[Link], values: dict[str, np.ndarray], out: Path, extra: dict) -> Path:
    import torch

    from oracle_torch import checkpoint as ock
    from oracle_torch.state import make_state, torch_dtype

    try:
        dt = torch_dtype(run.cfg.runtime.dtype)
        state = make_state(run, _state_arrays(links, values, TORCH), dt)
    except ValueError as e:
        raise MigrationError(f"the torch oracle refuses this run: {e}") from e
    for g in OPT_GROUPS:
        if f"opt.{g}.step" not in values:
            continue  # no update yet: torch creates AdamW state at the first one
        opt = state.opt_components if g == "components" else state.opt_ci_fn
        sd = opt.state_dict()
        sd["state"] = {i: {"step": torch.from_numpy(values[f"opt.{g}.step"].copy()),
                           "exp_avg": torch.from_numpy(values[f"opt.{g}.exp_avg.{n}"].copy()),
                           "exp_avg_sq": torch.from_numpy(values[f"opt.{g}.exp_avg_sq.{n}"].copy())}
                       for i, n in enumerate(state.group(g + "."))}
        opt.load_state_dict(sd)
    for b, srcs in state.sources.items():
        o = state.source_opt[b]
        for site in srcs:
            o["m"][site] = torch.from_numpy(values[f"opt.sources.exp_avg.sources.{b}.{site}"].copy())
            o["v"][site] = torch.from_numpy(values[f"opt.sources.exp_avg_sq.sources.{b}.{site}"].copy())
        o["t"] = int(values[f"opt.sources.{b}.step"])
    state.step = int(values["step"])
    if run.cfg.runtime.mesh.data > 1:
        path = _save_dcp(out, state, run, step, dt, extra)
    else:
        path = ock.save_checkpoint(out, state, run, step, run.cfg.checkpoint.keep, dt, extra)
    ock.load_checkpoint(path, run, dt)  # the destination's own loader accepts it (digest, format, config, structure)
    return path


def _save_dcp(out: Path, state, run: ResolvedRun, step: int, dt, extra: dict) -> Path:
    """The oracle's sharded format (S111) for `runtime.mesh.data` N ranks, written by this one
    process: DCP `.metadata` + `__0_0.distcp` holding every tensor whole (the oracle's own
    `state_tensors`), `meta.json` as the oracle's sharded save writes it (`world_size` N) and
    the digest last. DCP reshards on load: each of the N ranks reads its own rows. `out` is
    the migration's temp run dir (its rename is the commit)."""
    import warnings

    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    from contract import checkpoint_digest as cd, checkpoint_meta as cm
    from oracle_torch import checkpoint as ock, sharded_checkpoint as sc

    final = ock.checkpoint_root(out) / f"step_{step:08d}"
    final.mkdir(parents=True)
    with warnings.catch_warnings():  # DCP's note that no_dist means one process: that is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp_save(ock.state_tensors(state), checkpoint_id=str(final), no_dist=True)
    # the oracle's own metadata builder, as its sharded save calls it (oracle_torch/checkpoint.py)
    meta = ock._meta(state, run, step, dt, extra, sc.DCP_FORMAT, world_size=run.cfg.runtime.mesh.data)
    (final / cm.META_FILE).write_text(cm.meta_json(meta))
    for f in sc.files_of(final):
        cd.fsync_path(f)
    cd.write_digest(final, step)  # last: fsyncs itself and the dir
    return final


def _migrated_extra(reader: CheckpointReader, step: int) -> dict:
    meta = reader.meta
    extra = dict(meta.get("extra") or {})
    rec = {"backend": meta.get("backend"), "format": reader.fmt, "step": step, "checkpoint": str(reader.path.resolve()),
           "config_hash": meta.get("config_hash"), "generator": generator_of(meta)}
    if MIGRATED_FROM in extra:
        rec["previous"] = extra[MIGRATED_FROM]
    extra[MIGRATED_FROM] = rec
    return extra


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MigrationError(f"--out {out}: exists and is not an empty directory; migrate into a new run directory")
    if not out.parent.is_dir():
        raise MigrationError(f"--out {out}: its parent directory {out.parent} does not exist")


def migrate(src: str | Path, to: str, out: str | Path, check: bool = True, mesh_data: int | None = None) -> Path:
    """Migrate checkpoint `src` to backend `to` ("torch" | "jax") into the new run directory
    `out`, for a destination mesh of `mesh_data` data ranks (None: the source's); returns
    the new checkpoint directory (see the module docstring). `check` runs the streaming
    verifier on the result before it is committed."""
    from loop import rundir

    src, out = Path(src), Path(out)
    if to not in BACKENDS:
        raise MigrationError(f"--to: {to!r} is not one of {', '.join(BACKENDS)}")
    _check_out(out)
    reader = open_checkpoint(src)  # digest (S107) and format first
    tmp = out.parent / f".{out.name}.migrate-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        if reader.family == to and mesh_data is None:
            hint = "; --mesh-data N converts between the oracle's formats (1: one-process, N > 1: sharded)" if to == TORCH else ""
            raise MigrationError(f"{src}: already a {to} checkpoint (format {reader.fmt}){hint}")
        run, step, dtype = source_run(reader)
        drun = dest_run(run, mesh_data)
        fmt = dest_format(to, drun)
        if reader.fmt == fmt:
            raise MigrationError(f"{src}: already a {to} checkpoint (format {reader.fmt}, runtime.mesh.data "
                                 f"{drun.cfg.runtime.mesh.data}); the oracle resumes either of its formats on any number of ranks")
        if run.cfg.runtime.draws != "contract":
            _warn("the run draws on the device (runtime.draws: device): the destination continues it with its own "
                  "generator, so its continuation will not reproduce the source's (runtime.draws: contract does)")
        links = source_links(reader, run, step, dtype)
        values = translate(reader, links, to)
        tmp.mkdir()
        rundir.check_owner(tmp, to, drun.cfg.hash())  # run.json: the destination backend owns it (S104)
        extra = _migrated_extra(reader, step)
        write = _write_jax if to == JAX else _write_torch
        path = write(drun, step, links, values, tmp, extra)
        del values
        if reader.path.parent.name == "checkpoints":  # the source run's metrics before the step (S101)
            lines = read_metric_lines(reader.path.parent.parent / "metrics.jsonl", step)
            if lines:
                (tmp / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
        if check:
            dst = open_checkpoint(path)
            try:
                from parity.verify import verify_readers
                rep = verify_readers(reader, dst)
            finally:
                dst.close()
            if not rep.passed:
                raise MigrationError("the migrated checkpoint does not verify against its source (a bug in the "
                                     "migration): " + "; ".join(rep.lines()[2:8]))
        reader.close()
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
        return out / path.relative_to(tmp)
    except BaseException:
        reader.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Migrate a checkpoint to the other framework (a pure copy "
                                "through the layout table, verified leaf by leaf before it is committed).")
    p.add_argument("src", help="checkpoint directory (RUN/checkpoints/step_XXXXXXXX) of the oracle or the JAX trainer")
    p.add_argument("--to", required=True, choices=BACKENDS, help="destination backend")
    p.add_argument("--out", required=True, help="new run directory for the destination backend (must not exist, or be empty)")
    p.add_argument("--mesh-data", type=int, default=None, metavar="N",
                   help="the destination's runtime.mesh.data (default: the source's); with --to torch, N > 1 writes the "
                        "oracle's sharded (DCP) format for N ranks, N = 1 its one-process format")
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        path = migrate(args.src, args.to, args.out, mesh_data=args.mesh_data)
    except VPDError as e:
        print(f"{PROG}: error: {one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except (OSError, ValueError) as e:
        print(f"{PROG}: error: {one_line(str(e))}", file=sys.stderr)
        return EXIT_INPUT
    print(f"migrated {args.src} -> {path} (verified leaf by leaf against the source)")
    n = ((read_meta_json(path).get("config") or {}).get("runtime") or {}).get("mesh", {}).get("data", 1)
    print(f"resume with: python -m {'jax_impl' if args.to == JAX else 'oracle_torch'}.cli train CONFIG --out {args.out}"
          f"   (CONFIG: the source's, with runtime.mesh.data: {n})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
