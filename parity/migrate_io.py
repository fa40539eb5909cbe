"""Checkpoint readers for the migration and its verifier: one small adapter per checkpoint
format — open a checkpoint, list its leaves (name -> shape, dtype, from the headers only),
load ONE leaf by name — so a leaf pair is compared without holding either tree (S133).

    reader = open_checkpoint(path)        # verifies the digest (S107), picks the adapter by meta.json "format"
    reader.leaves()                        # {name: LeafInfo}
    reader.load(name)                      # one numpy array
    reader.close()

Adapters (`READERS`, keyed by the `format` a checkpoint's meta.json names):
- `SafetensorsReader` — the oracle's one-process checkpoint (`state.safetensors`); leaf names
  are the oracle's flat names; the safetensors header lists them, a leaf is read from its
  byte range straight into its own array (no memory map, so the resident set grows by that
  leaf alone);
- `DcpReader` — the oracle's sharded checkpoint (FSDP2 on N ranks, written through
  torch.distributed.checkpoint: `.metadata` + `__<rank>_0.distcp`); the tensors carry the
  one-process flat names (so `family` is "torch" and the link table applies unchanged),
  listed with their global shapes and dtypes from DCP's `.metadata`; a leaf is that ONE key
  loaded whole in this process without a process group (DCP reads only that key's chunks,
  from every rank's file, straight into the returned array);
- `OrbaxReader` — the JAX checkpoint (orbax item `state`); leaf names are tree paths `a/b/c`
  from the item's metadata; a leaf is a partial restore of that single array as numpy.

Another format plugs in as one more class with the same four members, registered under its
format string in `READERS`."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np

from contract import checkpoint_digest as cd
from contract.errors import CheckpointError
from parity.migrate_map import JAX, TORCH, MigrationError

ORACLE_FORMAT = "vpd-torch-oracle-checkpoint/1"  # oracle_torch/checkpoint.py FORMAT
ORACLE_DCP_FORMAT = "vpd-torch-oracle-checkpoint-dcp/1"  # oracle_torch/sharded_checkpoint.py DCP_FORMAT
DCP_METADATA = ".metadata"  # DCP's index of a sharded checkpoint (oracle_torch/sharded_checkpoint.py)
JAX_FORMAT = "vpd-jax-checkpoint/1"  # jax_impl/checkpoint.py FORMAT
ORACLE_STATE_FILE = "state.safetensors"
JAX_STATE_ITEM = "state"
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "I64": "int64", "I32": "int32", "I16": "int16",
              "I8": "int8", "U8": "uint8", "BOOL": "bool", "BF16": "bfloat16"}


@dataclass(frozen=True)
class LeafInfo:
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name ("float64", "int32", ...)


class CheckpointReader(Protocol):
    family: str  # "torch" | "jax": whose leaf names (parity/migrate_map.py Link.torch / Link.jax)
    fmt: str
    path: Path
    meta: dict

    def leaves(self) -> dict[str, LeafInfo]: ...

    def load(self, name: str) -> np.ndarray: ...

    def close(self) -> None: ...


def read_meta_json(path: Path) -> dict:
    m = path / cd.META_FILE
    if not m.is_file():
        raise MigrationError(f"{path}: no {cd.META_FILE} (not a checkpoint directory .../checkpoints/step_XXXXXXXX)")
    try:
        meta = json.loads(m.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise MigrationError(f"{m}: unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict):
        raise MigrationError(f"{m}: not a JSON object")
    return meta


class SafetensorsReader:
    family = TORCH
    legacy_files = (ORACLE_STATE_FILE,)

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta, self.fmt = path, meta, ORACLE_FORMAT
        self.file = path / ORACLE_STATE_FILE
        self._leaves: dict[str, LeafInfo] = {}
        self._where: dict[str, tuple[int, int]] = {}  # name -> (file offset, bytes)
        try:
            size = self.file.stat().st_size
            with open(self.file, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if not 0 < n <= size - 8:
                    raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
                header = json.loads(fh.read(n))
            for k, v in header.items():
                if k == "__metadata__":
                    continue
                dt, shape, (lo, hi) = str(v["dtype"]), tuple(int(x) for x in v["shape"]), v["data_offsets"]
                if not 0 <= lo <= hi <= size - 8 - n:
                    raise ValueError(f"tensor {k!r} lies past the end of the file")
                self._leaves[k] = LeafInfo(shape, _ST_DTYPES.get(dt, dt))
                self._where[k] = (8 + n + lo, hi - lo)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint {path}: {ORACLE_STATE_FILE} unreadable ({type(e).__name__}: {e})") from None

    def leaves(self) -> dict[str, LeafInfo]:
        return dict(self._leaves)

    def load(self, name: str) -> np.ndarray:
        """One tensor, read straight into its own array (no memory map: the resident set
        grows by that tensor alone)."""
        if name not in self._leaves:
            raise MigrationError(f"{self.file}: no leaf {name!r}")
        info, (off, nbytes) = self._leaves[name], self._where[name]
        try:
            dt = np.dtype(info.dtype)
            out = np.empty(info.shape, dtype=dt)
            if out.nbytes != nbytes:
                raise ValueError(f"{nbytes} bytes stored for {info.dtype} {list(info.shape)}")
            if nbytes:
                with open(self.file, "rb") as fh:
                    fh.seek(off)
                    if fh.readinto(cast(Any, out.reshape(-1).view(np.uint8))) != nbytes:
                        raise ValueError("file ends inside the tensor")
        except (OSError, ValueError, TypeError) as e:
            raise CheckpointError(f"{self.file}: leaf {name!r} unreadable ({type(e).__name__}: {e})") from None
        return out

    def close(self) -> None:
        pass


_TORCH_DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")


class DcpReader:
    """The oracle's sharded (DCP) checkpoint, read one whole tensor at a time in this process
    alone (no process group; DCP reshards any world size to one)."""
    family = TORCH
    legacy_files = (DCP_METADATA,)

    def __init__(self, path: Path, meta: dict):
        import torch
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.filesystem import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata
        from torch.distributed.checkpoint.state_dict_loader import load

        self.path, self.meta, self.fmt = path, meta, ORACLE_DCP_FORMAT
        self._dcp_load, self._torch, self._dcp_error = load, torch, CheckpointException
        try:
            md = FileSystemReader(str(path)).read_metadata()
        except Exception as e:  # noqa: BLE001 - an unreadable .metadata (pickle, missing) is a damaged checkpoint
            raise CheckpointError(f"checkpoint {path}: {DCP_METADATA} unreadable ({type(e).__name__}: {e})") from None
        self._leaves: dict[str, LeafInfo] = {}
        self._tensor: set[str] = set()
        self._files: dict[str, set[str]] = {}  # the shard files holding a key's chunks (named in a read error)
        for idx, si in (md.storage_data or {}).items():
            self._files.setdefault(getattr(idx, "fqn", ""), set()).add(str(getattr(si, "relative_path", "?")))
        names = {getattr(torch, d): d for d in _TORCH_DTYPES}
        for name, m in md.state_dict_metadata.items():
            if isinstance(m, TensorStorageMetadata):
                dt = m.properties.dtype
                self._leaves[name] = LeafInfo(tuple(int(s) for s in m.size), names.get(dt, str(dt).removeprefix("torch.")))
                self._tensor.add(name)
            else:  # a pickled object, not a tensor: named by no link (UNCLAIMED), never loaded
                self._leaves[name] = LeafInfo((), "object")

    def leaves(self) -> dict[str, LeafInfo]:
        return dict(self._leaves)

    def load(self, name: str) -> np.ndarray:
        """One tensor, whole: DCP reads only this key's chunks (from every rank's file that
        holds one) into an array allocated here, so the resident set grows by that tensor and
        one chunk in flight."""
        import warnings

        if name not in self._leaves:
            raise MigrationError(f"{self.path / DCP_METADATA}: no leaf {name!r}")
        info = self._leaves[name]
        if name not in self._tensor:
            raise MigrationError(f"{self.path / DCP_METADATA}: leaf {name!r} is a pickled object, not a tensor")
        if info.dtype not in _TORCH_DTYPES or info.dtype == "bfloat16":
            raise MigrationError(f"{self.path}: leaf {name!r} is {info.dtype}, which this tool does not read "
                                 "(the oracle's states are float32 or float64)")
        out = np.empty(info.shape, dtype=np.dtype(info.dtype))
        try:
            with warnings.catch_warnings():  # DCP's note that no_dist means one process: that is the intent
                warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
                self._dcp_load({name: self._torch.from_numpy(out)}, checkpoint_id=str(self.path), no_dist=True)
        except (Exception, self._dcp_error) as e:  # noqa: BLE001 - DCP wraps every reading failure (truncated shard,
            # missing file) in its CheckpointException, a BaseException
            fails = getattr(e, "failures", None)  # CheckpointException: {rank: (exception, traceback)}
            first = next(iter(fails.values())) if isinstance(fails, dict) and fails else None
            cause = first[0] if isinstance(first, tuple) and first and isinstance(first[0], BaseException) else e
            msg = next((ln.strip() for ln in str(cause).splitlines() if ln.strip()), "")[:200]
            files = ", ".join(sorted(self._files.get(name, ()))) or "?"
            raise CheckpointError(f"{self.path}: leaf {name!r} unreadable from its DCP shards ({files}): "
                                  f"{type(cause).__name__}: {msg}") from None
        return out

    def close(self) -> None:
        pass


def _keystr(k) -> str:
    return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))


class OrbaxReader:
    family = JAX
    legacy_files = (JAX_STATE_ITEM,)

    def __init__(self, path: Path, meta: dict):
        import jax
        import orbax.checkpoint as ocp

        self.path, self.meta, self.fmt = path, meta, JAX_FORMAT
        self.item = (path / JAX_STATE_ITEM).resolve()
        self._ocp, self._ck = ocp, ocp.PyTreeCheckpointer()
        try:
            md = self._ck.metadata(self.item)
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types
            raise CheckpointError(f"checkpoint {path}: orbax item '{JAX_STATE_ITEM}' unreadable ({type(e).__name__}: {e})") from None
        tree = getattr(md, "item_metadata", md)
        self._tree = getattr(tree, "tree", tree)
        self._keys: dict[str, tuple] = {}
        self._leaves: dict[str, LeafInfo] = {}
        for kp, v in jax.tree_util.tree_flatten_with_path(self._tree, is_leaf=lambda x: x is None)[0]:
            if v is None:
                continue  # optax's EmptyState entries (no array)
            keys = tuple(_keystr(k) for k in kp)
            name = "/".join(keys)
            self._keys[name] = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in kp)
            self._leaves[name] = LeafInfo(tuple(int(s) for s in v.shape), str(np.dtype(v.dtype)))

    def leaves(self) -> dict[str, LeafInfo]:
        return dict(self._leaves)

    def _partial(self, keys: tuple, leaf):
        """The nested structure holding only `leaf` at `keys` (lists keep their length, with None elsewhere)."""
        def build(node, ks):
            if not ks:
                return leaf
            k, rest = ks[0], ks[1:]
            if isinstance(node, list | tuple):
                out = [None] * len(node)
                out[k] = build(node[k], rest)
                return out
            return {k: build(node[k], rest)}
        return build(self._tree, keys)

    def load(self, name: str) -> np.ndarray:
        if name not in self._keys:
            raise MigrationError(f"{self.item}: no leaf {name!r}")
        keys = self._keys[name]
        ocp = self._ocp
        item = self._partial(keys, 0)
        args = self._partial(keys, ocp.RestoreArgs(restore_type=np.ndarray))
        try:
            out = self._ck.restore(self.item, args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{self.item}: leaf {name!r} unreadable ({type(e).__name__}: {e})") from None
        for k in keys:
            out = out[k]
        return np.asarray(out)

    def close(self) -> None:
        self._ck.close()


READERS: dict[str, type] = {ORACLE_FORMAT: SafetensorsReader, ORACLE_DCP_FORMAT: DcpReader, JAX_FORMAT: OrbaxReader}


def open_checkpoint(path: str | Path, verify: bool = True) -> CheckpointReader:
    """The reader of the checkpoint directory `path`: its meta.json names the format, the
    digest is checked first (S107: a missing, truncated or altered file is a CheckpointError
    naming it), then the adapter of that format opens it."""
    path = Path(path)
    if not path.is_dir():
        raise MigrationError(f"{path}: not a checkpoint directory (expected .../checkpoints/step_XXXXXXXX)")
    meta = read_meta_json(path)
    fmt = meta.get("format")
    if fmt not in READERS:
        raise MigrationError(f"{path / cd.META_FILE}: format {fmt!r} is not a checkpoint format this tool reads "
                             f"(known: {', '.join(sorted(READERS))})")
    cls = READERS[fmt]
    if verify:
        cd.verify_checkpoint(path, cls.legacy_files)
        meta = read_meta_json(path)  # the verified bytes
    return cls(path, meta)
