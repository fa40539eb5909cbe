"""The JAX trainer's training state (SPEC S30, S82-S84). Mirror: oracle_torch/state.py.

`TrainState` is a registered pytree (a frozen dataclass) holding everything a checkpoint
must restore: the trainable arrays by flat name (`components.*`, `ci_fn.*`,
contract/init.py), one optax AdamW state per group, the persistent-PGD sources with their
ascent state, and the step counter. The jitted step takes one and returns the next."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from contract.config import OptimizerConfig
from contract.init import init_state
from contract.resolve import ResolvedRun
from jax_impl.adversary import init_source_opt

DTYPES = {"float32": jnp.float32, "float64": jnp.float64}


def jax_dtype(name: str):
    """The dtype of the masters and optimizer moments (bf16 compute keeps fp32 masters, S70)."""
    if name == "bf16":
        return jnp.float32
    if name not in DTYPES:
        raise ValueError(f"runtime.dtype: the JAX trainer runs float32 or float64, not {name!r}")
    if name == "float64" and not jax.config.read("jax_enable_x64"):
        raise ValueError("runtime.dtype: float64 needs jax_enable_x64 (set JAX_ENABLE_X64=1 before JAX starts)")
    return DTYPES[name]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class TrainState:
    params: dict[str, jax.Array]
    opt_components: Any  # optax state of the components' AdamW
    opt_ci_fn: Any  # optax state of the CI function's AdamW
    step: jax.Array  # int32 scalar
    # persistent PGD (S82-S84): bundle -> {site: source}, bundle -> {"m", "v", "t"}
    sources: dict[str, dict[str, jax.Array]]
    source_opt: dict[str, dict]

    def replace(self, **changes) -> TrainState:
        return dataclasses.replace(self, **changes)

    def to_tree(self) -> dict:
        """The plain-dict tree a checkpoint stores (field name -> subtree)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_tree(cls, tree: dict) -> TrainState:
        return cls(**tree)


def adamw(oc: OptimizerConfig):
    # lr is injected every step from the host-side schedule (S40)
    return optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, b1=oc.betas[0], b2=oc.betas[1],
                                                 eps=oc.eps, weight_decay=oc.weight_decay)


def split_groups(params: dict) -> tuple[dict, dict]:
    comp = {n: p for n, p in params.items() if n.startswith("components.")}
    ci = {n: p for n, p in params.items() if n.startswith("ci_fn.")}
    return comp, ci


def make_state(run: ResolvedRun, arrays: dict[str, np.ndarray] | None, dtype) -> TrainState:
    """The state of step 0 from `arrays` (flat names, contract/init.py; None = `init_state(run)`)."""
    arrays = init_state(run) if arrays is None else arrays
    params = {n: jnp.asarray(a, dtype=dtype) for n, a in arrays.items() if not n.startswith("sources.")}
    comp, ci = split_groups(params)
    o = run.cfg.optim
    sources: dict[str, dict[str, jax.Array]] = {}
    for t in run.recon_terms:
        if t.source == "persistent_pgd":
            if t.bundle is None:  # resolve_run names the bundle of every persistent term (S85)
                raise ValueError(f"loss_terms.{t.index}: a persistent PGD term without a source bundle")
            sources[t.bundle] = {s.name: jnp.asarray(arrays[f"sources.{t.bundle}.{s.name}"], dtype=dtype)
                                 for s in run.sites}
    return TrainState(params=params, opt_components=adamw(o.components).init(comp), opt_ci_fn=adamw(o.ci_fn).init(ci),
                      step=jnp.asarray(0, jnp.int32), sources=sources,
                      source_opt={b: init_source_opt(v) for b, v in sources.items()})


def abstract_tree(run: ResolvedRun, dtype) -> dict:
    """Shapes, dtypes and pytree structure of `make_state(run, ...).to_tree()` (nothing
    allocated): the tree a checkpoint stores and the mesh lays out (jax_impl/mesh.py)."""
    shapes = {n: jax.ShapeDtypeStruct(a.shape, dtype) for n, a in init_state(run).items()}
    return jax.eval_shape(lambda arrays: make_state(run, arrays, dtype).to_tree(), shapes)
