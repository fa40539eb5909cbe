"""vpd-layout-diff: compare two safetensors files (or two checkpoint directories) tensor
by tensor (SPEC S71).

    vpd-layout-diff A B [--atol X]
    python -m contract.layout_diff A B

A and B are each a `.safetensors` file or a directory; a directory stands for the union of
the tensors of its top-level `*.safetensors` files (a tensor name held by two files of one
directory is an error). One row per tensor name (sorted), with one status:

  IDENTICAL      same shape and equal values (default: bitwise equal, same dtype)
  TRANSPOSED     2-D, B == A.T but B != A (a square matrix included)
  VALUES DIFFER  same shape, values differ: count, max abs diff, max rel diff, where
  SHAPE DIFFERS  shapes differ (both printed)
  MISSING        present on one side only (says which side lacks it)

Equality: with `--atol 0` (the default) a tensor is IDENTICAL only if its bytes are equal
(so -0.0 vs 0.0 differs, NaN vs the same NaN does not). With `--atol X > 0` it is
IDENTICAL when every |a - b| <= X (NaNs must sit at the same places). A dtype difference
counts as VALUES DIFFER unless the values are equal after casting both to their common
dtype; then the row is IDENTICAL and says that the dtypes differ.
Max rel diff is max |a - b| / max(|a|, |b|) over the differing elements.

Exit code: 0 iff every row is IDENTICAL; 1 otherwise; 2 on bad arguments or an unreadable
path (the message names the file). Tensors are loaded one pair at a time (memory stays at
about two tensors). numpy + safetensors only (no torch/jax, contract/ rule).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open

IDENTICAL, TRANSPOSED, VALUES_DIFFER, SHAPE_DIFFERS, MISSING = (
    "IDENTICAL", "TRANSPOSED", "VALUES DIFFER", "SHAPE DIFFERS", "MISSING")
STATUSES = (IDENTICAL, TRANSPOSED, VALUES_DIFFER, SHAPE_DIFFERS, MISSING)

# safetensors dtypes numpy cannot represent natively: read as raw bits.
# BF16 decodes exactly to float32; the float8 kinds are compared bitwise only.
_RAW_BITS = {"BF16": np.uint16, "F8_E4M3": np.uint8, "F8_E5M2": np.uint8}


class DiffError(Exception):
    """A path that cannot be read; the message names the file. Exit code 2."""


@dataclass
class Tensor:
    dtype: str  # safetensors dtype string, e.g. "F32", "BF16"
    shape: tuple[int, ...]
    data: np.ndarray  # as stored (raw unsigned bits for _RAW_BITS dtypes)

    @property
    def values(self) -> np.ndarray | None:
        """Numeric values for arithmetic; None if numpy cannot decode the dtype."""
        if self.dtype == "BF16":
            return (self.data.astype(np.uint32) << 16).view(np.float32)
        if self.dtype in _RAW_BITS:
            return None
        return self.data

    def bits(self) -> np.ndarray:
        """An unsigned-integer view of the stored bytes (for bitwise equality)."""
        a = self.data
        if a.dtype.kind == "u":
            return a
        try:
            return a.view(np.dtype(f"u{a.dtype.itemsize}"))
        except TypeError:  # no unsigned type of that width: compare bytes
            return np.ascontiguousarray(a).view(np.uint8).reshape(a.shape + (a.dtype.itemsize,))

    @property
    def T(self) -> Tensor:
        return Tensor(self.dtype, tuple(reversed(self.shape)), self.data.T)


def _read_raw(path: Path, name: str) -> np.ndarray:
    """Read one tensor's bytes by parsing the safetensors header (for dtypes numpy lacks)."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
        info = header[name]
        lo, hi = info["data_offsets"]
        fh.seek(8 + n + lo)
        buf = fh.read(hi - lo)
    return np.frombuffer(buf, dtype=_RAW_BITS[info["dtype"]]).reshape(info["shape"])


class TensorSource:
    """The tensors of one file or directory, indexed by name, loaded one at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise DiffError(f"{self.path}: directory holds no *.safetensors file")
        elif self.path.is_file():
            files = [self.path]
        elif self.path.exists():
            raise DiffError(f"{self.path}: not a regular file or directory")
        else:
            raise DiffError(f"{self.path}: no such file or directory")
        self.where: dict[str, Path] = {}
        self.header: dict[str, tuple[str, tuple[int, ...]]] = {}
        for f in files:
            try:
                with safe_open(str(f), framework="np") as h:
                    for k in h.keys():
                        sl = h.get_slice(k)
                        if k in self.where:
                            raise DiffError(f"{f}: tensor {k!r} is also in {self.where[k]} (same directory)")
                        self.where[k] = f
                        self.header[k] = (sl.get_dtype(), tuple(sl.get_shape()))
            except DiffError:
                raise
            except Exception as e:  # safetensors raises its own error types
                raise DiffError(f"{f}: not a readable safetensors file ({type(e).__name__}: {e})") from None

    def names(self) -> set[str]:
        return set(self.where)

    def load(self, name: str) -> Tensor:
        f = self.where[name]
        dtype, shape = self.header[name]
        try:
            if dtype in _RAW_BITS:
                data = _read_raw(f, name)
            else:
                with safe_open(str(f), framework="np") as h:
                    data = h.get_tensor(name)
        except Exception as e:
            raise DiffError(f"{f}: cannot read tensor {name!r} ({type(e).__name__}: {e})") from None
        return Tensor(dtype, shape, data)


@dataclass
class Row:
    name: str
    status: str
    detail: str = ""


@dataclass
class _Cmp:
    equal: bool
    note: str = ""  # why equal despite not bitwise / how they differ


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _value_stats(x: np.ndarray, y: np.ndarray) -> tuple[int, float, float, tuple[int, ...]]:
    """(#differing elements, max abs diff, max rel diff, index of max abs diff).
    Equal = equal after casting to the common dtype, or NaN on both sides."""
    ct = np.result_type(x.dtype, y.dtype)
    xc, yc = x.astype(ct, copy=False), y.astype(ct, copy=False)
    same = xc == yc
    if ct.kind in "fc":
        same |= np.isnan(xc) & np.isnan(yc)
    n = int(same.size - np.count_nonzero(same))
    if n == 0:
        return 0, 0.0, 0.0, ()
    xf, yf = x.astype(np.float64), y.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        absd = np.abs(xf - yf)
        absd = np.where(same, 0.0, np.where(np.isnan(absd), np.inf, absd))
        denom = np.maximum(np.abs(xf), np.abs(yf))
        rel = np.where(absd == 0, 0.0, absd / denom)
        rel = np.where(np.isnan(rel), np.inf, rel)
    i = np.unravel_index(int(np.argmax(absd)), absd.shape) if absd.ndim else ()
    return n, float(absd.max()), float(rel.max()), tuple(int(v) for v in i)


def _compare_same_shape(a: Tensor, b: Tensor, atol: float) -> _Cmp:
    dtype_note = "" if a.dtype == b.dtype else f"dtype {a.dtype} vs {b.dtype}"
    if a.dtype == b.dtype and np.array_equal(a.bits(), b.bits()):
        return _Cmp(True)
    va, vb = a.values, b.values
    if va is None or vb is None:
        why = f"{a.dtype if va is None else b.dtype} cannot be decoded; bytes compared"
        return _Cmp(False, "; ".join(filter(None, [dtype_note, why, "bytes differ"])))
    n, mabs, mrel, at = _value_stats(va, vb)
    if n == 0:
        if dtype_note:
            return _Cmp(True, f"{dtype_note}; values equal after casting to {np.result_type(va.dtype, vb.dtype)}")
        # same dtype, numerically equal but not bitwise (e.g. -0.0 vs 0.0, NaN payloads)
        if atol > 0:
            return _Cmp(True, "values equal (not bitwise: signed zeros or NaN payloads)")
        return _Cmp(False, "values equal numerically but bytes differ (signed zeros or NaN payloads)")
    stats = f"{n}/{va.size} differ, max abs diff {_fmt(mabs)} at {list(at)}, max rel diff {_fmt(mrel)}"
    if atol > 0 and mabs <= atol:
        return _Cmp(True, "; ".join(filter(None, [dtype_note, f"within atol {_fmt(atol)}: {stats}"])))
    return _Cmp(False, "; ".join(filter(None, [dtype_note, stats])))


def compare(name: str, a: Tensor | None, b: Tensor | None, atol: float = 0.0) -> Row:
    if a is None:
        if b is None:
            raise ValueError(name)
        return Row(name, MISSING, f"missing in A (B: {b.dtype} {list(b.shape)})")
    if b is None:
        return Row(name, MISSING, f"missing in B (A: {a.dtype} {list(a.shape)})")
    two_d = len(a.shape) == 2 and len(b.shape) == 2
    if a.shape == b.shape:
        c = _compare_same_shape(a, b, atol)
        if c.equal:
            return Row(name, IDENTICAL, c.note)
        if two_d and a.shape[0] == a.shape[1]:
            ct = _compare_same_shape(a.T, b, atol)
            if ct.equal:
                return Row(name, TRANSPOSED, "square: B == A.T" + (f" ({ct.note})" if ct.note else ""))
        return Row(name, VALUES_DIFFER, c.note)
    shapes = f"A {list(a.shape)} vs B {list(b.shape)}"
    if two_d and b.shape == a.shape[::-1]:
        ct = _compare_same_shape(a.T, b, atol)
        if ct.equal:
            return Row(name, TRANSPOSED, f"{shapes}: B == A.T" + (f" ({ct.note})" if ct.note else ""))
        return Row(name, SHAPE_DIFFERS, f"{shapes} (transposed shape, but B != A.T: {ct.note})")
    return Row(name, SHAPE_DIFFERS, shapes)


def diff_paths(a: str | Path, b: str | Path, atol: float = 0.0) -> list[Row]:
    """Compare two files/directories; one Row per tensor name (sorted). Raises DiffError."""
    sa, sb = TensorSource(a), TensorSource(b)
    rows = []
    for name in sorted(sa.names() | sb.names()):
        ta = sa.load(name) if name in sa.where else None
        tb = sb.load(name) if name in sb.where else None
        rows.append(compare(name, ta, tb, atol))
        del ta, tb
    return rows


def format_rows(rows: list[Row]) -> list[str]:
    w = max((len(r.name) for r in rows), default=4)
    return [f"{r.status:<13}  {r.name:<{w}}  {r.detail}".rstrip() for r in rows]


def summary(rows: list[Row]) -> str:
    counts = {s: sum(r.status == s for r in rows) for s in STATUSES}
    parts = ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s])
    verdict = "all IDENTICAL" if counts[IDENTICAL] == len(rows) else "DIFFERENT"
    return f"{len(rows)} tensors: {parts or 'none'} -> {verdict}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vpd-layout-diff",
        description="Compare two safetensors files or checkpoint directories tensor by tensor: "
                    "IDENTICAL / TRANSPOSED / VALUES DIFFER / SHAPE DIFFERS / MISSING. "
                    "Exit 0 iff everything is IDENTICAL, 1 otherwise, 2 on bad input.")
    p.add_argument("a", help="first .safetensors file or directory of *.safetensors")
    p.add_argument("b", help="second .safetensors file or directory of *.safetensors")
    p.add_argument("--atol", type=float, default=0.0,
                   help="absolute tolerance; 0 (default) = bitwise equality")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    try:
        args = p.parse_args(argv)
    except SystemExit as e:  # argparse already printed the message; 2 on bad arguments
        return int(e.code or 0)
    if not (args.atol >= 0):  # also rejects NaN
        print(f"vpd-layout-diff: error: --atol must be >= 0 (got {args.atol})", file=sys.stderr)
        return 2
    try:
        rows = diff_paths(args.a, args.b, args.atol)
    except DiffError as e:
        print(f"vpd-layout-diff: error: {e}", file=sys.stderr)
        return 2
    print(f"A: {args.a}")
    print(f"B: {args.b}")
    for line in format_rows(rows):
        print(line)
    print(summary(rows))
    return 0 if all(r.status == IDENTICAL for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
