"""Verify a migrated checkpoint against its source, leaf by leaf, streaming (SPEC S133).

    python -m parity.verify SRC_CHECKPOINT DST_CHECKPOINT

SRC and DST are checkpoint directories (`.../checkpoints/step_XXXXXXXX`), a checkpoint and its
migration, in either order: any pair of the oracle's one-process format (safetensors), the
oracle's sharded format (DCP, written on N ranks) and the JAX trainer's (orbax) — oracle and
JAX either way, or the oracle's two formats (the same flat names; the copy is the identity).
The verifier
1. checks both against their digests (S107) and reads their meta.json;
2. builds the links of the source's run from the migration's own table
   (parity/migrate_map.py::build_links: the mapping tested is the mapping applied) and
   proves they cover both trees one to one: every leaf of either checkpoint is named by
   exactly one link (a leaf left over, or one a link names but the checkpoint lacks, fails
   its group as UNCLAIMED / MISSING);
3. loads ONE leaf pair at a time (safetensors reading one byte range, DCP loading that one
   key whole without a process group, orbax restoring that single array), maps the source
   leaf through the link (the layout table's transform between the frameworks, the declared
   counter dtypes) and compares bit for bit with shape and dtype; a tensor that equals the
   transpose is TRANSPOSED (contract/layout_diff.py), not "values differ";
4. compares the metadata: config (`runtime.mesh` aside: a checkpoint resumes on another
   mesh, S111; each side's config hash must be its own config's), dtype, target weights,
   `extra`, a sharded side's `world_size` (its config's `runtime.mesh.data`), and the
   generator (the migrated side records the source's generator in `extra.migrated_from`; a
   JAX side names the production generator of its own config's mesh).

It prints one line per failing leaf and PASS/FAIL per group (components, CI function,
optimizer states, sources, counters, config), then the verdict. Exit code: 0 every group
passes, 1 a group fails, 2 bad input (not a checkpoint, unknown format; the message names
the file or field), 5 a checkpoint fails its digest (names the file). Peak memory is about
two leaves (`--load-all` holds both trees instead: only for measuring that difference)."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contract.checkpoint_meta import computed
from contract.config import ConfigError, parse_config
from contract.errors import EXIT_INPUT, VPDError
from contract.layout import TRANSFORMS
from contract.layout_diff import IDENTICAL, SHAPE_DIFFERS, TRANSPOSED, VALUES_DIFFER, Tensor, compare
from contract.resolve import ResolvedRun, resolve_run
from contract.runlog import one_line
from parity.migrate_io import ORACLE_DCP_FORMAT, CheckpointReader, LeafInfo, open_checkpoint
from parity.migrate_map import (
    CONFIG,
    COUNTERS,
    GROUPS,
    JAX,
    TORCH,
    Link,
    MigrationError,
    build_links,
    coverage,
    generator_of,
    torch_opt_groups_of,
)

PROG = "parity.verify"
MISSING, UNCLAIMED, DTYPE_DIFFERS = "MISSING", "UNCLAIMED", "DTYPE DIFFERS"
MIGRATED_FROM = "migrated_from"  # the `extra` entry a migration writes (parity/migrate.py)
_NP_TO_ST = {"float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32", "int16": "I16",
             "int8": "I8", "uint8": "U8", "bool": "BOOL"}


@dataclass
class Row:
    group: str
    name: str  # what was compared (a leaf pair, a coverage gap, a metadata field)
    status: str  # IDENTICAL = pass; anything else fails
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == IDENTICAL


@dataclass
class Report:
    rows: list[Row]
    src: str
    dst: str

    def failed_groups(self) -> list[str]:
        return [g for g in GROUPS if any(r.group == g and not r.ok for r in self.rows)]

    @property
    def passed(self) -> bool:
        return not self.failed_groups()

    def group_rows(self, g: str) -> list[Row]:
        return [r for r in self.rows if r.group == g]

    def lines(self) -> list[str]:
        out = [f"SRC: {self.src}", f"DST: {self.dst}"]
        for r in self.rows:
            if not r.ok:
                out.append(f"  {r.status:<13}  [{r.group}] {r.name}" + (f"  {r.detail}" if r.detail else ""))
        for g in GROUPS:
            rows = self.group_rows(g)
            bad = [r for r in rows if not r.ok]
            verdict = "FAIL" if bad else "PASS"
            what = f"{len(rows)} checks" if not bad else f"{len(bad)} of {len(rows)} checks fail, first: {bad[0].name} {bad[0].status}"
            out.append(f"{verdict}  {g:<17} ({what})")
        fg = self.failed_groups()
        out.append("verdict: PASS (every leaf and field equal, bit for bit)" if not fg else f"verdict: FAIL ({', '.join(fg)})")
        return out


def _tensor(a: np.ndarray) -> Tensor:
    return Tensor(_NP_TO_ST.get(str(a.dtype), str(a.dtype)), tuple(a.shape), a)


class _Loader:
    """One leaf at a time from a reader (or, `load_all`, every leaf up front: the
    load-everything comparison the streaming one is measured against)."""

    def __init__(self, reader: CheckpointReader, load_all: bool = False):
        self.reader = reader
        self.info: dict[str, LeafInfo] = reader.leaves()
        self.cache = {n: reader.load(n) for n in self.info} if load_all else None

    def load(self, name: str) -> np.ndarray:
        return self.cache[name] if self.cache is not None else self.reader.load(name)


def _dtype_rows(lk: Link, side: str, leaf: str, info: LeafInfo, want_dtype: str | None, want_shape) -> Row | None:
    """A failing row when a leaf's header disagrees with its link (dtype, shape), else None."""
    if want_dtype is not None and info.dtype != want_dtype:
        return Row(lk.group, leaf, DTYPE_DIFFERS, f"{side} leaf is {info.dtype}, the link says {want_dtype}")
    if want_dtype is None and info.dtype not in ("float32", "float64"):
        return Row(lk.group, leaf, DTYPE_DIFFERS, f"{side} leaf is {info.dtype}, expected a float")
    if want_shape is not None and tuple(info.shape) != tuple(want_shape):
        return Row(lk.group, leaf, SHAPE_DIFFERS, f"{side} leaf has shape {list(info.shape)}, the link says {list(want_shape)}")
    return None


def _apply(transform: str, a: np.ndarray) -> np.ndarray:
    return TRANSFORMS[transform][0](a)


def _partner(name: str) -> str | None:
    """components.<site>.V <-> components.<site>.U (to name a swap)."""
    if name.startswith("components.") and name[-2:] in (".V", ".U"):
        return name[:-1] + ("U" if name.endswith("V") else "V")
    return None


def _leaves_of(lk: Link, side: str) -> list[str]:
    """The leaves a link names in a checkpoint of family `side` (none: that side stores none)."""
    if side == TORCH:
        return [lk.torch] if lk.torch is not None else []
    return list(lk.jax)


def _transform(lk: Link, src_side: str, dst_side: str) -> str:
    """The layout transform from the source's leaf to the destination's: the layout table's
    between the frameworks, the identity between the oracle's two formats."""
    return lk.transform() if src_side != dst_side else "identity"


def _compare_tensor(lk: Link, src: _Loader, dst: _Loader, src_side: str, dst_side: str,
                    links_by_torch: dict[str, Link]) -> Row:
    sleaf, dleaf = _leaves_of(lk, src_side)[0], _leaves_of(lk, dst_side)[0]
    label = f"{sleaf} -> {dleaf}" if sleaf != dleaf else sleaf
    a = src.load(sleaf)
    exp = _apply(_transform(lk, src_side, dst_side), a)  # identity/transpose are self-inverse (contract/layout.py)
    b = dst.load(dleaf)
    if str(a.dtype) != str(b.dtype):
        return Row(lk.group, label, DTYPE_DIFFERS, f"SRC {a.dtype}, DST {b.dtype}")
    r = compare(label, _tensor(exp), _tensor(b))
    del a
    if r.status == IDENTICAL:
        return Row(lk.group, label, IDENTICAL)
    detail = r.detail
    p = _partner(lk.name)
    if p is not None and r.status != TRANSPOSED and p in links_by_torch:
        pl = links_by_torch[p]
        pleaf = _leaves_of(pl, src_side)[0]
        if pleaf in src.info:
            pe = _apply(_transform(pl, src_side, dst_side), src.load(pleaf))
            if compare(p, _tensor(pe), _tensor(b)).status == IDENTICAL:
                detail = f"DST holds SRC {pleaf} (V and U swapped)" + (f"; {detail}" if detail else "")
    return Row(lk.group, label, r.status, detail)


def _counter_values(loader: _Loader, leaves: list[str]) -> list[int | str]:
    out: list[int | str] = []
    for leaf in leaves:
        v = loader.load(leaf)
        f = float(v)
        out.append(int(f) if f == int(f) else f"{f!r} (not an integer)")
    return out


def _compare_counter(lk: Link, src: _Loader, dst: _Loader, src_side: str, dst_side: str) -> Row:
    sl, dl = _leaves_of(lk, src_side), _leaves_of(lk, dst_side)
    sv, dv = _counter_values(src, sl), _counter_values(dst, dl)
    t_leaves, j_leaves = (sl, dl) if src_side == TORCH else (dl, sl)
    label = f"{' = '.join(t_leaves)} <-> {' = '.join(j_leaves)}"
    for leaves, vals in ((sl, sv), (dl, dv)):
        if len(set(map(str, vals))) > 1:
            return Row(lk.group, label, VALUES_DIFFER, "the JAX copies disagree: " + ", ".join(f"{x}={v}" for x, v in zip(leaves, vals, strict=True)))
    if str(sv[0]) != str(dv[0]):
        return Row(lk.group, label, VALUES_DIFFER, f"SRC {sv[0]}, DST {dv[0]}")
    return Row(lk.group, label, IDENTICAL)


def _compare_zeros(lk: Link, jax_loader: _Loader) -> Row:
    for leaf in lk.jax:
        v = jax_loader.load(leaf)
        n = int(np.count_nonzero(v))
        if n:
            return Row(lk.group, leaf, VALUES_DIFFER, f"{n}/{v.size} nonzero: the oracle side holds no AdamW state for this "
                                                      "group (no update yet), so the JAX leaf must be zero")
    return Row(lk.group, " = ".join(lk.jax), IDENTICAL)


def _compare_hyper(lk: Link, jax_loader: _Loader) -> Row:
    leaf = lk.jax[0]
    v = jax_loader.load(leaf)
    want = np.asarray(lk.value, dtype=v.dtype)
    if v.shape != () or v.tobytes() != want.tobytes():
        return Row(lk.group, leaf, VALUES_DIFFER, f"holds {v!r}, the config gives {want!r}")
    return Row(lk.group, leaf, IDENTICAL)


def _mesh_data(meta: dict):
    """The `runtime.mesh.data` of a checkpoint's stored config (1 when it names none)."""
    rt = (meta.get("config") or {}).get("runtime") or {}
    return (rt.get("mesh") or {}).get("data", 1)


def _own_hash(meta: dict) -> str | None:
    """The hash of a checkpoint's stored config (None: it does not parse)."""
    import copy
    try:
        cfg = meta.get("config")
        return parse_config(copy.deepcopy(cfg), "stored config").hash() if isinstance(cfg, dict) else None
    except (ConfigError, ValueError, TypeError):
        return None


def _meta_rows(run: ResolvedRun, sm: dict, dm: dict, step: int, formats: tuple[str, str]) -> list[Row]:
    rows = []

    def same(group: str, field: str, a, b) -> None:
        rows.append(Row(group, f"meta.json {field}", IDENTICAL if a == b else VALUES_DIFFER,
                        "" if a == b else f"SRC {_short(a)}, DST {_short(b)}"))

    sc, dc = sm.get("config") or {}, dm.get("config") or {}
    if computed(sc) != computed(dc):  # runtime.mesh may differ: where a run runs is not what it computes (S111)
        from contract.config import config_diff
        diff = config_diff(computed(sc), computed(dc))
        rows.append(Row(CONFIG, "meta.json config", VALUES_DIFFER, "; ".join(x.strip() for x in diff[:5])))
    else:
        rows.append(Row(CONFIG, "meta.json config", IDENTICAL))
    for label, m, h in (("SRC", sm, run.cfg.hash()), ("DST", dm, _own_hash(dm))):
        ok = m.get("config_hash") == h
        rows.append(Row(CONFIG, f"meta.json config_hash ({label})", IDENTICAL if ok else VALUES_DIFFER,
                        "" if ok else f"{m.get('config_hash')} is not the hash of its config ({h})"))
    for label, m, fmt in (("SRC", sm, formats[0]), ("DST", dm, formats[1])):
        if fmt == ORACLE_DCP_FORMAT:  # the oracle's sharded save records the ranks it ran on = its config's mesh
            ws, n = m.get("world_size"), _mesh_data(m)
            ok = isinstance(ws, int) and not isinstance(ws, bool) and ws == n
            rows.append(Row(CONFIG, f"meta.json world_size ({label})", IDENTICAL if ok else VALUES_DIFFER,
                            "" if ok else f"{ws!r}, its config's runtime.mesh.data is {n!r}"))
    same(CONFIG, "dtype", sm.get("dtype"), dm.get("dtype"))
    same(CONFIG, "target_sha256", sm.get("target_sha256"), dm.get("target_sha256"))
    se = {k: v for k, v in (sm.get("extra") or {}).items() if k != MIGRATED_FROM}
    de = {k: v for k, v in (dm.get("extra") or {}).items() if k != MIGRATED_FROM}
    same(CONFIG, "extra (without migrated_from)", se, de)
    rows.append(_generator_row(run, sm, dm))
    rows.append(Row(COUNTERS, "meta.json step", IDENTICAL if sm.get("step") == dm.get("step") == step else VALUES_DIFFER,
                    "" if sm.get("step") == dm.get("step") else f"SRC {sm.get('step')}, DST {dm.get('step')}"))
    return rows


def _short(x) -> str:
    s = repr(x)
    return s if len(s) <= 120 else s[:120] + "…"


def _generator_row(run: ResolvedRun, sm: dict, dm: dict) -> Row:
    """The generator metadata: the migrated side names the other side's generator, backend,
    step and format in `extra.migrated_from`, and a JAX side names the production generator its config
    implies (the JAX trainer refuses a resume under another, S91)."""
    name = "generator (meta.json prng_impl, extra.migrated_from)"
    problems = []
    for label, m in (("SRC", sm), ("DST", dm)):
        if m.get("backend") == "jax":
            from jax_impl.train import prng_impl
            want = prng_impl(_mesh_data(m))
            if generator_of(m) != want:
                problems.append(f"{label} prng_impl {generator_of(m)!r}, its config draws with {want!r}")
    mig = [(label, m, other) for label, m, other in (("DST", dm, sm), ("SRC", sm, dm))
           if isinstance((m.get("extra") or {}).get(MIGRATED_FROM), dict)]
    if not mig:
        problems.append("neither side records extra.migrated_from (not a migration of the other)")
    else:  # the migrated side is the one whose record names the other (both record one after a chain of migrations)
        found = []
        for label, m, other in mig:
            rec = m["extra"][MIGRATED_FROM]
            found.append([f"{label} extra.migrated_from.{k} is {rec.get(k)!r}, the other side's is {want!r}"
                          for k, want in (("generator", generator_of(other)), ("backend", other.get("backend")),
                                          ("step", other.get("step")), ("format", other.get("format")))
                          if rec.get(k) != want])
        if all(found):
            problems += found[0]
    return Row(CONFIG, name, VALUES_DIFFER if problems else IDENTICAL, "; ".join(problems))


def verify_readers(src: CheckpointReader, dst: CheckpointReader, load_all: bool = False) -> Report:
    if src.family == dst.family == JAX:
        raise MigrationError(f"{src.path} and {dst.path} are both jax checkpoints: the verifier compares a "
                             "checkpoint with its migration (to the other framework, or between the oracle's two formats)")
    cfg = src.meta.get("config")
    if not isinstance(cfg, dict):
        raise MigrationError(f"{src.path / 'meta.json'}: field 'config' missing")
    try:
        run = resolve_run(parse_config(cfg, f"config stored in {src.path}"))
    except (ConfigError, ValueError, FileNotFoundError) as e:
        raise MigrationError(f"{src.path}: its stored config does not resolve: {e}") from e
    step, dtype = src.meta.get("step"), src.meta.get("dtype")
    if not isinstance(step, int) or dtype not in ("float32", "float64"):
        raise MigrationError(f"{src.path / 'meta.json'}: step {step!r} / dtype {dtype!r} is not a checkpoint's")
    sl, dl = _Loader(src, load_all), _Loader(dst, load_all)
    ss, ds = src.family, dst.family
    torch_l = sl if ss == TORCH else dl
    jax_ls = [x for x, side in ((sl, ss), (dl, ds)) if side == JAX]
    links = build_links(run, step, dtype, torch_opt_groups_of(torch_l.info))
    rows: list[Row] = []
    gaps: set[str] = set()
    for label, side, loader in (("SRC", src.family, sl), ("DST", dst.family, dl)):
        missing, unclaimed = coverage(links, side, loader.info)
        for g, leaf in missing:
            rows.append(Row(g, leaf, MISSING, f"{label} ({side}) lacks this leaf"))
            gaps.add(leaf)
        for g, leaf in unclaimed:
            rows.append(Row(g, leaf, UNCLAIMED, f"{label} ({side}) leaf named by no link of the migration table"))
    by_torch = {lk.torch: lk for lk in links if lk.torch is not None}
    for lk in links:
        leaves = [(ss, x, sl) for x in _leaves_of(lk, ss)] + [(ds, x, dl) for x in _leaves_of(lk, ds)]
        if not leaves:
            continue  # a JAX-only leaf (zeros, hyper) between the oracle's two formats: on neither side
        if any(leaf in gaps for _, leaf, _ in leaves):
            continue  # already failed as MISSING
        bad = None
        for side, leaf, loader in leaves:
            want_dtype = lk.torch_dtype if side == TORCH else lk.jax_dtype
            want_shape = lk.shape if side == TORCH else lk.jax_shape()
            bad = bad or _dtype_rows(lk, side, leaf, loader.info[leaf], want_dtype, want_shape)
        if bad is not None and not (lk.kind == "tensor" and bad.status == SHAPE_DIFFERS):
            rows.append(bad)  # a tensor of the wrong shape goes on to the comparison (TRANSPOSED, swapped V/U)
            continue
        if lk.kind == "tensor":
            rows.append(_compare_tensor(lk, sl, dl, ss, ds, by_torch))
        elif lk.kind == "counter":
            rows.append(_compare_counter(lk, sl, dl, ss, ds))
        elif lk.kind == "zeros":
            rows += [_compare_zeros(lk, jl) for jl in jax_ls]
        else:
            rows += [_compare_hyper(lk, jl) for jl in jax_ls]
    rows += _meta_rows(run, src.meta, dst.meta, step, (src.fmt, dst.fmt))
    return Report(rows, str(src.path), str(dst.path))


def verify(src: str | Path, dst: str | Path, load_all: bool = False) -> Report:
    """Verify checkpoint `dst` against `src` (see the module docstring); raises VPDError on
    input that cannot be compared (MigrationError, CheckpointError naming the file)."""
    a = open_checkpoint(src)
    try:
        b = open_checkpoint(dst)
        try:
            return verify_readers(a, b, load_all)
        finally:
            b.close()
    finally:
        a.close()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Verify a migrated checkpoint against its source, leaf by leaf "
                                "(bit for bit, shape and dtype), one leaf pair in memory at a time. Exit 0 PASS, 1 FAIL, "
                                "2 bad input, 5 a damaged checkpoint.")
    p.add_argument("src", help="source checkpoint directory (.../checkpoints/step_XXXXXXXX)")
    p.add_argument("dst", help="migrated checkpoint directory")
    p.add_argument("--load-all", action="store_true", help="hold both trees in memory (only to measure the difference)")
    return p


def main(argv: list[str] | None = None, out: Callable[[str], None] = print) -> int:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        rep = verify(args.src, args.dst, args.load_all)
    except VPDError as e:
        print(f"{PROG}: error: {one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except (OSError, ValueError) as e:
        print(f"{PROG}: error: {one_line(str(e))}", file=sys.stderr)
        return EXIT_INPUT
    for line in rep.lines():
        out(line)
    return 0 if rep.passed else 1


if __name__ == "__main__":
    sys.exit(main())
