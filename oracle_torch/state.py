"""The oracle's training state (SPEC S30, S82-S84). Mirror: jax_impl/state.py.

`TrainState` holds everything a checkpoint must restore: the trainable tensors by flat name
(`components.*`, `ci_fn.*`, contract/init.py), one AdamW per group, the persistent-PGD
sources with their ascent state, and the step counter."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from contract.config import OptimizerConfig
from contract.init import init_state
from contract.resolve import ResolvedRun
from oracle_torch.adversary import init_source_opt

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

    def group(self, prefix: str) -> list[str]:
        return [n for n in self.params if n.startswith(prefix)]


def make_params(arrays: dict[str, np.ndarray], dtype) -> dict[str, torch.nn.Parameter]:
    return {n: torch.nn.Parameter(torch.tensor(a, dtype=dtype)) for n, a in arrays.items()}


def _adamw(params: list, oc: OptimizerConfig) -> torch.optim.AdamW:
    # lr is set from the schedule every step; foreach=False keeps the per-tensor reference math
    return torch.optim.AdamW(params, lr=0.0, betas=oc.betas, eps=oc.eps,
                             weight_decay=oc.weight_decay, foreach=False)


def make_state(run: ResolvedRun, arrays: dict[str, np.ndarray] | None, dtype) -> TrainState:
    """The state of step 0 from `arrays` (flat names, contract/init.py; None = `init_state(run)`)."""
    if run.cfg.runtime.mesh.data != 1:
        raise ValueError("runtime.mesh.data: the oracle trains in one process (its FSDP2 path is not "
                         "implemented); use runtime.mesh.data: 1 — the JAX trainer shards over a mesh")
    arrays = init_state(run) if arrays is None else arrays
    params = make_params({n: a for n, a in arrays.items() if not n.startswith("sources.")}, dtype)
    comp = [p for n, p in params.items() if n.startswith("components.")]
    ci = [p for n, p in params.items() if n.startswith("ci_fn.")]
    o = run.cfg.optim
    sources = {t.bundle: {s.name: torch.tensor(arrays[f"sources.{t.bundle}.{s.name}"], dtype=dtype) for s in run.sites}
               for t in run.recon_terms if t.source == "persistent_pgd"}
    return TrainState(params, _adamw(comp, o.components), _adamw(ci, o.ci_fn),
                      sources=sources, source_opt={b: init_source_opt(v) for b, v in sources.items()})
