"""The data ranks of one oracle run (SPEC S108-S112): which slice of the global batch this
process trains on, and the few reductions that make N ranks compute the one-process step.

`runtime.mesh.data: N` runs N processes ("ranks") over a CPU gloo process group; the
trainable tensors are sharded by FSDP2 (`oracle_torch/state.py`). The rules (S109):
- every loss term's value is the GLOBAL value on every rank: a batch mean is the global sum
  of the ranks' partial sums (a differentiable all-reduce) over the global count, the
  importance-minimality sums are all-reduced before the log, faithfulness reads whole V/U;
- hence the backward of a term through the all-reduce hands rank r N times its own share
  of the gradient (the all-reduce's backward sums the identical upstream gradients), and
  FSDP2's reduce-scatter AVERAGES over the N ranks: parameter gradients come out exactly the
  one-process ones (the faithfulness gradient, identical on every rank, averages to itself);
- a source's gradient (fresh or persistent PGD) is taken by autograd on the same values, so
  rank r holds N x its share too: shared-scope sources (one tensor on every rank) take the
  average over ranks, per-position sources (`bsc`, sharded with the batch) their own / N.

At world size 1 every helper is the identity and nothing here touches the numbers: the
one-process oracle is bit-identical with or without this module (S112)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

# the variables a launcher (torchrun, or `python -m oracle_torch.cli`, which runs torchrun)
# sets for every rank; all or none (S110)
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_ENV = "VPD_DIST_TIMEOUT_S"  # seconds a collective may wait for a peer (default 300)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the run's data ranks (world 1 = the one-process oracle)."""

    world: int = 1
    rank: int = 0

    @property
    def sharded(self) -> bool:
        return self.world > 1

    @property
    def primary(self) -> bool:
        """Rank 0: the one that writes metrics, logs and the checkpoint's own files."""
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This rank's rows of a global batch axis of length n (contiguous, n / world each)."""
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def row_ids(self, n_local: int) -> torch.Tensor:
        """The global indices of this rank's `n_local` batch rows."""
        return self.rank * n_local + torch.arange(n_local)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of each rank's `x`, differentiable (S109; identity at world 1)."""
        if not self.sharded:
            return x
        import torch.distributed._functional_collectives as fc
        group = dist.group.WORLD
        assert group is not None  # sharded => the process group exists (join)
        return fc.all_reduce(x, "sum", group)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """The mean over every global position of `x`, whose rows this rank holds (S109)."""
        if not self.sharded:
            return x.mean()
        return self.sum(x.sum()) / (x.numel() * self.world)

    def source_grad(self, g: torch.Tensor, per_position: bool) -> torch.Tensor:
        """The gradient of a global term with respect to a source, from this rank's autograd
        value (N x its share, S109): shared sources average over ranks, per-position ones / N."""
        if not self.sharded:
            return g
        if per_position:
            return g / self.world
        g = g.detach().clone()
        dist.all_reduce(g)
        return g / self.world

    def norms(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The 2-norm of each tensor, whole; on N ranks from the shards of DTensors, in one
        all-reduce of their squared sums (never one gather per tensor)."""
        if not self.sharded:
            return [torch.linalg.vector_norm(t) for t in tensors]
        return [torch.sqrt(s) for s in self._whole_sq(tensors)]

    def sq_sums(self, tensors: list[torch.Tensor]) -> list[float]:
        """sum(t ** 2) of each tensor, whole (as `norms`)."""
        if not self.sharded:
            return [float((t ** 2).sum()) for t in tensors]
        return [float(s) for s in self._whole_sq(tensors)]

    def _whole_sq(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        sq = torch.stack([(local(t) ** 2).sum() for t in tensors])
        sharded = torch.tensor([isinstance(t, DTensor) for t in tensors])
        total = sq * sharded  # the shards' sums add up over ranks; a replicated tensor counts once
        dist.all_reduce(total)
        return torch.where(sharded, total, sq)

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """The global-batch tensor of which every rank holds its rows (identity at world 1)."""
        if not self.sharded:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.detach().contiguous())
        return torch.cat(parts)

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any (a stop request, a non-finite leaf)."""
        if not self.sharded:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int64)
        dist.all_reduce(t)
        return bool(t.item())

    def barrier(self) -> None:
        if self.sharded:
            dist.barrier()


ONE = Ranks()


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded (DTensor) one; a plain tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (its storage: writes go into the DTensor); a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


_MESH: list = []  # the ranks' device mesh, made once per process


def device_mesh(world: int):
    """The 1-D CPU device mesh of the ranks (S108), made once per process and reused by every
    state (a mesh may set up process groups of its own)."""
    if not _MESH:
        from torch.distributed.device_mesh import init_device_mesh
        _MESH.append(init_device_mesh("cpu", (world,)))
    return _MESH[0]


def launch_env() -> dict[str, str]:
    """The launcher variables that are set."""
    return {k: os.environ[k] for k in LAUNCH_ENV if k in os.environ}


def check_launch_env(n: int) -> bool:
    """Whether this process is one of the launcher's ranks (S110). A half-set environment or
    a launcher world size other than runtime.mesh.data `n` is refused (ValueError naming them)."""
    env = launch_env()
    if not env:
        return False
    missing = [k for k in LAUNCH_ENV if k not in env]
    if missing:
        raise ValueError(f"the launcher environment is half set: {', '.join(sorted(env))} set but "
                         f"{', '.join(missing)} missing; start through `torchrun --nproc-per-node {n}` (which sets all "
                         f"of {', '.join(LAUNCH_ENV)}) or unset them")
    world = int(env["WORLD_SIZE"])
    if world != n:
        raise ValueError(f"runtime.mesh.data: {n} ranks in the config, but the launcher started WORLD_SIZE={world}; "
                         f"use `--nproc-per-node {n}` or set runtime.mesh.data: {world}")
    return True


def join(n: int) -> Ranks:
    """The ranks of a run with runtime.mesh.data `n`: ONE for n == 1 (outside any launcher,
    or under a launcher of world size 1), else this process's rank in the launcher's gloo
    process group (initialised here once, with a timeout on every collective)."""
    launched = check_launch_env(n)
    if n == 1:
        return ONE
    if not launched:
        raise ValueError(f"runtime.mesh.data: {n} ranks requested, but this process was not started as one of them; "
                         f"run `python -m oracle_torch.cli train ...` (it starts the {n} ranks) or "
                         f"`torchrun --nproc-per-node {n} -m oracle_torch.cli train ...`")
    if not dist.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "300")))
        dist.init_process_group("gloo", timeout=timeout)
    return Ranks(world=dist.get_world_size(), rank=dist.get_rank())


def leave() -> None:
    """Leave the process group: every rank first (a rank that tears its connections down
    while a peer still talks to it aborts that peer)."""
    if not dist.is_initialized():
        return
    try:
        dist.barrier()
    except RuntimeError:  # a peer is gone already (the run is failing): nothing to wait for
        pass
    _MESH.clear()
    dist.destroy_process_group()
