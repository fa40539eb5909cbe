"""Sharded checkpoints of the oracle on N data ranks (SPEC S111), through
`torch.distributed.checkpoint` (DCP). oracle_torch/checkpoint.py dispatches here.

A sharded checkpoint dir `checkpoints/step_XXXXXXXX/` holds DCP's files (`.metadata` and one
`__<rank>_0.distcp` per rank: every rank writes only its own shards), then `meta.json` (format
`DCP_FORMAT`, the world size it was written on) and `digest.json`, written by rank 0 last.
The tensors carry the flat names of the one-process format (`state_tensors`): parameters
and their AdamW moments as DTensors sharded on dim 0, per-position (`bsc`) sources and
their moments as DTensors sharded over the batch rows, everything else (shared sources,
counters) replicated.

Atomic like the one-process format: the ranks write into one hidden temp dir beside the
final one, rank 0 adds meta and digest and renames it into place once every rank's shards
are written; a kill at any moment leaves the previous checkpoints intact.

Resharding: DCP reads whatever shards a rank's tensors need, so a checkpoint written on N
ranks loads on M ranks (each rank reads its own shards) and, without a process group, on
one (every tensor whole)."""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from contract.checkpoint_digest import unreadable
from oracle_torch.ranks import local

DCP_FORMAT = "vpd-torch-oracle-checkpoint-dcp/1"
DCP_METADATA = ".metadata"


def tmp_dir(final: Path) -> Path:
    """The temp dir of a sharded save: the same name on every rank (rank 0 clears leftovers first)."""
    return final.parent / f".tmp-{final.name}-sharded"


def write_shards(tmp: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Collective: every rank writes its shards of `tensors` into `tmp` (DCP)."""
    dcp_save(tensors, checkpoint_id=str(tmp))


def saved_tensors(path: Path) -> dict:
    """{name: DCP tensor metadata (size, dtype)} of a sharded checkpoint."""
    try:
        md = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - an unreadable .metadata is a damaged checkpoint
        raise unreadable(path, DCP_METADATA, e) from e
    return dict(md.state_dict_metadata)


def read_whole(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint, whole, in this process alone (no process group)."""
    out = {}
    for name, md in saved_tensors(path).items():
        out[name] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    _load(path, out, no_dist=True)
    return out


def read_into(path: Path, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Collective: fill `template` (DTensors are filled with this rank's shards) from `path`."""
    _load(path, template, no_dist=False)
    return template


def _load(path: Path, tensors: dict, no_dist: bool) -> None:
    try:
        with warnings.catch_warnings():  # DCP's note that no_dist means one process: that is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp_load(tensors, checkpoint_id=str(path), no_dist=no_dist)
    except Exception as e:  # noqa: BLE001 - DCP wraps every reading failure (truncated shard, missing file)
        raise unreadable(path, "its DCP shards", e) from e


def like(template: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """`whole` laid out like `template`: this rank's shard of a DTensor template, else itself."""
    if isinstance(template, DTensor):
        return distribute_tensor(whole, template.device_mesh, template.placements, src_data_rank=None)
    return whole


def rows_dtensor(t: torch.Tensor, mesh) -> DTensor:
    """A per-position tensor of which this rank holds its batch rows, as a DTensor of the global batch."""
    return DTensor.from_local(t, mesh, [Shard(0)], run_check=False)


def unwrap(t: torch.Tensor) -> torch.Tensor:
    """This rank's tensor of a loaded leaf (a shard's own copy, never a view of the template)."""
    return local(t).clone()


def clear(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def files_of(tmp: Path) -> list[Path]:
    return sorted(p for p in tmp.iterdir() if p.is_file())


def publish(tmp: Path, final: Path) -> None:
    """Rename the written temp dir into place (replacing a checkpoint of the same step)."""
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
