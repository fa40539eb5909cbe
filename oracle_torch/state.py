"""The oracle's training state (SPEC S30, S82-S84). Mirror: jax_impl/state.py.

`TrainState` holds everything a checkpoint must restore: the trainable tensors by flat name
(`components.*`, `ci_fn.*`, contract/init.py), one AdamW per group, the persistent-PGD
sources with their ascent state, and the step counter.

On N data ranks (S108) the trainable tensors live in one `Trainable` module sharded by FSDP2
(`fully_shard` over a 1-D CPU device mesh): `params` are then DTensors sharded on dim 0, their
AdamW moments too, and a forward through `state.module` gathers them whole. Shared-scope
persistent sources are replicated on every rank; per-position (`bsc`) ones hold this rank's
rows of the global batch."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from contract.config import OptimizerConfig
from contract.init import init_state
from contract.resolve import ResolvedRun, persistent_cfg
from oracle_torch.adversary import init_source_opt
from oracle_torch.ranks import ONE, Ranks, device_mesh

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"runtime.dtype: the torch oracle runs float32 or float64, not {name!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))


@dataclass
class TrainState:
    params: dict[str, torch.nn.Parameter]
    opt_components: torch.optim.AdamW
    opt_ci_fn: torch.optim.AdamW
    step: int = 0
    # persistent PGD (S82-S84): bundle -> {site: source}, bundle -> {"m", "v", "t"}
    sources: dict = field(default_factory=dict)
    source_opt: dict = field(default_factory=dict)
    ranks: Ranks = ONE
    module: Trainable | None = None  # the FSDP2-sharded home of `params` on N ranks (S108), else None
    row_sharded: frozenset[str] = frozenset()  # bundles whose sources hold this rank's batch rows (N ranks, bsc)
    mesh: DeviceMesh | None = None  # the ranks' device mesh (N ranks), else None

    def group(self, prefix: str) -> list[str]:
        return [n for n in self.params if n.startswith(prefix)]


class Trainable(nn.Module):
    """The trainable tensors as one module, the unit FSDP2 shards (S108). `forward(fn, ...)`
    calls `fn(params, ...)` with the whole tensors by flat name: FSDP2 gathers them before and
    reduce-scatters their gradients after the backward."""

    def __init__(self, params: dict[str, nn.Parameter]):
        super().__init__()
        self.names = list(params)
        self.tensors = nn.ParameterDict({_key(n): p for n, p in params.items()})

    def params(self) -> dict[str, nn.Parameter]:
        return {n: self.tensors[_key(n)] for n in self.names}

    def forward(self, fn, *args):
        return fn(self.params(), *args)


def _key(name: str) -> str:
    return name.replace(".", "/")  # a module's parameter names hold no dots


def make_params(arrays: dict[str, np.ndarray], dtype) -> dict[str, torch.nn.Parameter]:
    return {n: torch.nn.Parameter(torch.tensor(a, dtype=dtype)) for n, a in arrays.items()}


def _adamw(params: list, oc: OptimizerConfig) -> torch.optim.AdamW:
    # lr is set from the schedule every step; foreach=False keeps the per-tensor reference math
    return torch.optim.AdamW(params, lr=0.0, betas=oc.betas, eps=oc.eps,
                             weight_decay=oc.weight_decay, foreach=False)


def per_position(run: ResolvedRun, bundle: str | None) -> bool:
    """Whether a persistent bundle's sources are per position (`bsc`: sharded with the batch)."""
    return persistent_cfg(run, next(t for t in run.recon_terms if t.bundle == bundle)).scope == "bsc"


def make_state(run: ResolvedRun, arrays: dict[str, np.ndarray] | None, dtype, ranks: Ranks = ONE) -> TrainState:
    """The state of step 0 from `arrays` (flat names, contract/init.py; None = `init_state(run)`),
    whole tensors; on N ranks sharded here (S108)."""
    arrays = init_state(run) if arrays is None else arrays
    params = make_params({n: a for n, a in arrays.items() if not n.startswith("sources.")}, dtype)
    module = mesh = None
    if ranks.sharded:
        from torch.distributed.fsdp import fully_shard
        module, mesh = Trainable(params), device_mesh(ranks.world)
        fully_shard(module, mesh=mesh, reshard_after_forward=True)
        params = module.params()  # fully_shard replaced them by sharded DTensor parameters
    comp = [p for n, p in params.items() if n.startswith("components.")]
    ci = [p for n, p in params.items() if n.startswith("ci_fn.")]
    o = run.cfg.optim
    sources, row_sharded = {}, set()
    for t in run.recon_terms:
        if t.source == "persistent_pgd":
            rows = slice(None)
            if ranks.sharded and per_position(run, t.bundle):
                rows = ranks.rows(run.cfg.batch_size)
                row_sharded.add(t.bundle)
            sources[t.bundle] = {s.name: torch.tensor(arrays[f"sources.{t.bundle}.{s.name}"][rows], dtype=dtype)
                                 for s in run.sites}
    return TrainState(params, _adamw(comp, o.components), _adamw(ci, o.ci_fn),
                      sources=sources, source_opt={b: init_source_opt(v) for b, v in sources.items()},
                      ranks=ranks, module=module, row_sharded=frozenset(row_sharded), mesh=mesh)
