"""The migration's tables (SPEC S130-S133): which leaf of an oracle checkpoint is which leaf
of a JAX checkpoint. One table serves both directions and the verifier, so the mapping
that is tested is the mapping that is applied (parity/migrate.py, parity/verify.py).

A `Link` ties the oracle's leaf (its flat name in `state.safetensors`, contract/init.py and
oracle_torch/checkpoint.py) to the JAX leaves (orbax tree paths of `TrainState.to_tree()`,
spelled `a/b/c`) holding the same quantity. `build_links(run, step, torch_opt_groups)` lists
every link of a run; the leaves of the two checkpoints must be exactly the leaves the links
name, one to one (`coverage`). Kinds:

- `tensor`: the same array; the torch -> JAX transform is the layout table's
  (`contract.layout.layout_transform(name, "torch", "jax")`, today the identity for every
  trainable kind), dtype the state's on both sides;
- `counter`: an integer count, exact in both dtypes (the oracle's AdamW step is a float32
  tensor, its other counters int64; JAX counts in int32); a JAX optax state holds its update
  count twice (`count` of `inject_hyperparams` and of `scale_by_adam`), so the link names
  both JAX leaves and they must agree;
- `zeros`: a JAX leaf whose oracle counterpart does not exist because torch creates AdamW
  state lazily: before a group's first update the oracle stores no moments and no step
  for it, JAX stores zero moments and a zero count (the same optimizer state);
- `hyper`: a JAX optax hyper-parameter (b1, b2, eps, eps_root, weight_decay from the
  config; learning_rate, the schedule value of the last step, S40) that the oracle takes
  from the config instead of storing it; checked against the config.

Framework-free (numpy + contract/); the readers and writers are parity/migrate_io.py and
parity/migrate.py."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from contract.errors import EXIT_INPUT, VPDError
from contract.init import init_ci_fn, init_components, init_sources
from contract.layout import layout_transform
from contract.resolve import ResolvedRun
from contract.schedules import schedule_value

TORCH, JAX = "torch", "jax"
BACKENDS = (TORCH, JAX)
# the verifier's groups, in its report order
COMPONENTS, CI_FN, OPTIM, SOURCES, COUNTERS, CONFIG = (
    "components", "CI function", "optimizer states", "sources", "counters", "config")
GROUPS = (COMPONENTS, CI_FN, OPTIM, SOURCES, COUNTERS, CONFIG)
OPT_GROUPS = ("components", "ci_fn")  # the two AdamW groups (S42)
HYPERS = ("b1", "b2", "eps", "eps_root", "learning_rate", "weight_decay")
TORCH_STEP_DTYPE = "float32"  # torch.optim.AdamW keeps `step` as a float32 tensor (default dtype float32)
TORCH_COUNT_DTYPE = "int64"  # the oracle's `step` and `opt.sources.<bundle>.step`
JAX_COUNT_DTYPE = "int32"  # every JAX counter (optax counts, source ascent `t`, `step`)
KINDS = ("tensor", "counter", "zeros", "hyper")


class MigrationError(VPDError):
    """A checkpoint that cannot be migrated or verified as asked; the message names the
    checkpoint and the leaf or field (exit code 2, input invalid)."""
    exit_code = EXIT_INPUT


@dataclass(frozen=True)
class Link:
    group: str  # one of GROUPS
    name: str  # the flat name the layout table classifies (the oracle's name, or a label for JAX-only leaves)
    torch: str | None  # the oracle's leaf; None: the oracle stores none (kinds zeros, hyper)
    jax: tuple[str, ...]  # the JAX leaves (orbax paths "a/b/c"); two for a duplicated optax count
    kind: str  # one of KINDS
    shape: tuple[int, ...]  # torch-side shape (file layout)
    torch_dtype: str | None  # numpy dtype name on the oracle's side
    jax_dtype: str | None  # numpy dtype name on the JAX side; None (hyper): the checkpoint's float dtype
    value: float | None = None  # kind hyper: the value the leaf must hold (before the cast to its dtype)

    def transform(self) -> str:
        """'identity' or 'transpose': torch layout -> JAX layout (contract/layout.py)."""
        if self.kind != "tensor":
            return "identity"
        return layout_transform(self.name, TORCH, JAX)

    def jax_shape(self) -> tuple[int, ...]:
        return self.shape[::-1] if self.transform() == "transpose" else self.shape


class _ShapeOnly:
    """Stands in for an array in `init_*` so their names and shapes come out without
    allocating the model (a checkpoint larger than memory is verified leaf by leaf)."""

    def __init__(self, shape):
        self.shape = tuple(int(s) for s in shape)

    def __mul__(self, _other):
        return self


class _ShapeGen:
    def standard_normal(self, shape):
        return _ShapeOnly(shape)

    def random(self, shape):
        return _ShapeOnly(shape)


def state_shapes(run: ResolvedRun) -> dict[str, tuple[int, ...]]:
    """{flat name: shape} of the run's trainable state (contract/init.py order), nothing allocated
    (biases come from `np.zeros`, whose pages are not touched)."""
    g = cast(np.random.Generator, _ShapeGen())
    out = init_components(run, g) | init_ci_fn(run, g) | init_sources(run, g)
    return {n: tuple(cast(Any, a).shape) for n, a in out.items()}


def opt_group(name: str) -> str:
    return "components" if name.startswith("components.") else "ci_fn"


def lr_of_last_step(run: ResolvedRun, group: str, step: int, dtype: str) -> float:
    """The learning rate a JAX optax state holds after `step` training steps: the schedule
    value injected for step `step - 1` (rounded to the run's dtype, as the step computes it),
    0.0 before the first step (jax_impl/state.py::adamw)."""
    if step == 0:
        return 0.0
    oc = getattr(run.cfg.optim, group)
    return float(np.asarray(schedule_value(oc.lr, step - 1, run.cfg.steps), dtype=dtype))


def build_links(run: ResolvedRun, step: int, dtype: str, torch_opt_groups: set[str] | frozenset[str]) -> list[Link]:
    """Every link of a checkpoint of `run` at `step` holding a `dtype` state; the AdamW
    groups of `torch_opt_groups` have state on the oracle's side (the others have not had an
    update yet: their JAX moments and counts must be zero)."""
    shapes = state_shapes(run)
    links: list[Link] = []
    for n, shp in shapes.items():
        if n.startswith("sources."):
            continue
        links.append(Link(COMPONENTS if n.startswith("components.") else CI_FN, n, n, (f"params/{n}",), "tensor",
                          shp, dtype, dtype))
    for g in OPT_GROUPS:
        og = f"opt_{g}"
        has = g in torch_opt_groups
        for n, shp in shapes.items():
            if n.startswith("sources.") or opt_group(n) != g:
                continue
            for tm, jm in (("exp_avg", "mu"), ("exp_avg_sq", "nu")):
                tn = f"opt.{g}.{tm}.{n}"
                links.append(Link(OPTIM, tn, tn if has else None, (f"{og}/inner_state/0/{jm}/{n}",),
                                  "tensor" if has else "zeros", shp, dtype if has else None, dtype))
        tn = f"opt.{g}.step"
        links.append(Link(COUNTERS, tn, tn if has else None, (f"{og}/inner_state/0/count", f"{og}/count"),
                          "counter" if has else "zeros", (), TORCH_STEP_DTYPE if has else None, JAX_COUNT_DTYPE))
        oc = getattr(run.cfg.optim, g)
        values = {"b1": oc.betas[0], "b2": oc.betas[1], "eps": oc.eps, "eps_root": 0.0,
                  "weight_decay": oc.weight_decay, "learning_rate": lr_of_last_step(run, g, step, dtype)}
        for h in HYPERS:
            links.append(Link(CONFIG, f"{og}.hyperparams.{h}", None, (f"{og}/hyperparams/{h}",), "hyper", (), None, None,
                              float(values[h])))
    bundles = sorted({t.bundle for t in run.recon_terms if t.source == "persistent_pgd" and t.bundle is not None})
    for b in bundles:
        for site in run.site_names:
            n = f"sources.{b}.{site}"
            shp = shapes[n]
            links.append(Link(SOURCES, n, n, (f"sources/{b}/{site}",), "tensor", shp, dtype, dtype))
            for tm, jm in (("exp_avg", "m"), ("exp_avg_sq", "v")):
                tn = f"opt.sources.{tm}.{n}"
                links.append(Link(OPTIM, tn, tn, (f"source_opt/{b}/{jm}/{site}",), "tensor", shp, dtype, dtype))
        tn = f"opt.sources.{b}.step"
        links.append(Link(COUNTERS, tn, tn, (f"source_opt/{b}/t",), "counter", (), TORCH_COUNT_DTYPE, JAX_COUNT_DTYPE))
    links.append(Link(COUNTERS, "step", "step", ("step",), "counter", (), TORCH_COUNT_DTYPE, JAX_COUNT_DTYPE))
    return links


def torch_opt_groups_of(torch_leaves) -> frozenset[str]:
    """The AdamW groups an oracle checkpoint holds state for (its `opt.<group>.step`)."""
    return frozenset(g for g in OPT_GROUPS if f"opt.{g}.step" in torch_leaves)


def side_leaves(links: list[Link], side: str) -> dict[str, Link]:
    """{leaf of `side`: its link}; MigrationError if two links claim one leaf (a table bug)."""
    out: dict[str, Link] = {}
    for lk in links:
        for leaf in (lk.torch,) if side == TORCH else lk.jax:
            if leaf is None:
                continue
            if leaf in out:
                raise MigrationError(f"migration table: {side} leaf {leaf!r} is claimed by {out[leaf].name!r} and {lk.name!r}")
            out[leaf] = lk
    return out


def group_of_leaf(leaf: str) -> str:
    """The verifier group of a leaf no link claims (named in a coverage failure)."""
    parts = leaf.replace("/", ".").split(".")
    if leaf == "step" or parts[-1] in ("step", "count", "t"):
        return COUNTERS
    if "hyperparams" in parts:
        return CONFIG
    if parts[0] in ("opt", "source_opt") or parts[0].startswith("opt_"):
        return OPTIM
    if parts[0] == "sources":
        return SOURCES
    rest = parts[1:] if parts[0] == "params" else parts
    return COMPONENTS if rest and rest[0] == "components" else CI_FN


def coverage(links: list[Link], side: str, leaves) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(missing, unclaimed) leaves of one checkpoint against the links, each as (group, leaf):
    `missing` are leaves a link names that the checkpoint lacks; `unclaimed` are leaves of
    the checkpoint no link names. Both empty = the links cover that tree one to one."""
    want = side_leaves(links, side)
    have = set(leaves)
    missing = [(want[x].group, x) for x in want if x not in have]
    unclaimed = [(group_of_leaf(x), x) for x in sorted(have - set(want))]
    return missing, unclaimed


def generator_of(meta: dict) -> str:
    """The production generator a checkpoint's run drew with (S50): a JAX checkpoint names
    it (`prng_impl`; one without predates Philox: threefry2x32), the oracle draws with
    torch's generator seeded per (seed, step)."""
    if meta.get("backend") == "jax":
        return str(meta.get("prng_impl", "threefry2x32"))
    return "torch"
