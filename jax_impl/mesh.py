"""The device mesh of the JAX trainer (SPEC S91, S140-S142). `runtime.mesh: {data: D,
components: K}` builds a ("data", "components") mesh of D x K devices, over one process or
several (jax.distributed, jax_impl/launch.py). The step is one jitted function of GLOBAL
arrays: the batch and every batch-shaped draw are sharded over `data`; V [d_in, C], U
[C, d_out], the CI function's per-component parameters and output layer, their Adam moments
and every [..., C] draw over `components`; the rest is replicated. XLA partitions the
program and inserts the collectives, so the traps of hand-written parallelism cannot occur:
imp-min sums run over the global batch before the log, shared-scope source gradients are
gradients of the global-mean loss, a norm over C is a norm over all of C.

`state_specs` is the one table of what is sharded how (TRANSITION.md lists it leaf by leaf);
`check_layout` refuses a state a mesh cannot hold, naming the leaf, its size and the axis's."""
from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from contract.adversary import n_channels
from contract.config import PersistentPGDTerm
from contract.draws import DrawSpec
from contract.resolve import ResolvedRun

AXES = ("data", "components")
DATA, COMP = AXES


def mesh_shape(run: ResolvedRun) -> tuple[int, int]:
    m = run.cfg.runtime.mesh
    return m.data, m.components


def make_mesh(data: int, components: int = 1) -> Mesh:
    """The (data, components) mesh over the first D*K devices (all of them with several
    processes: each process owns a contiguous block of rows, so it holds whole batch slices)."""
    n, have = data * components, jax.device_count()
    what = f"runtime.mesh.data: {n} devices requested" if components == 1 else \
        f"runtime.mesh: {n} devices requested (data {data} x components {components})"
    if n > have:
        raise ValueError(f"{what}, {have} available (on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={n} "
                         f"before JAX starts, or start the devices over several processes with --processes)")
    if jax.process_count() > 1 and n != have:
        raise ValueError(f"{what}, the {jax.process_count()} processes hold {have}; every device of the run must be "
                         "on the mesh")
    devices = np.asarray(jax.devices()[:n]).reshape(data, components)
    # Auto axes: XLA propagates the shardings through the step (no explicit-sharding types)
    return Mesh(devices, AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def serial(out):
    """With several devices, wait until a dispatched program has finished before the caller
    dispatches the next (one device: `out` as it is, dispatch stays asynchronous).

    Why (issue #13): XLA's CPU client launches each device's share of a program on a shared
    thread pool, where a launch first waits for a slot of that device's in-flight semaphore, and
    a share that reaches a collective waits there for its peers. A loop of jitted programs with
    no host read between them (the faithfulness warmup's 100 steps) hung both processes of the
    tiny LM at 5 s of CPU time; gdb showed, in each process, one pool thread in
    `gloo::allreduce` (one local device inside program n, waiting for its peers), one pool thread
    blocked in `Semaphore::Acquire` under `CpuPjRtRawLoadedExecutable::Execute` (a launch of a
    later program) and the main thread dispatching in `PjitFunction::Call`: the other local
    device's share of program n never ran. The same starvation hit one process of 4 simulated
    devices on this 2-core machine (the tiny LM's (2, 2) mesh, under load): XLA aborted after 40 s
    with two pool threads in the in-process all-reduce of devices [0, 1] and [2, 3], each
    waiting for a peer that never arrived. One program in flight at a time cannot starve."""
    return jax.block_until_ready(out) if jax.device_count() > 1 else out


def make_data_mesh(n: int) -> Mesh:
    """A data-only mesh of n devices (the S91 mesh; `make_mesh(n, 1)`)."""
    return make_mesh(n, 1)


# ------------------------------------------------------------------ what is sharded how
_PER_COMPONENT_CI = ("mlp", "vector_mlp")  # ci_fn.<site>.w{i} [C, a, b], b{i} [C, b]


def _last_layer(run: ResolvedRun) -> str:
    return f"w{len(run.cfg.ci_fn.hidden)}"


def param_spec(run: ResolvedRun, name: str, ndim: int) -> P:
    """The PartitionSpec of a trainable leaf (and of its Adam moments) by its flat name."""
    if name.startswith("components."):
        return P(None, COMP) if name.endswith(".V") else P(COMP, None)
    if not name.startswith("ci_fn."):
        return P()
    t = run.cfg.ci_fn.type
    if t in _PER_COMPONENT_CI and not name.startswith("ci_fn.global."):
        return P(COMP, *([None] * (ndim - 1)))  # one MLP per component, C leading
    last = _last_layer(run)
    out_layer = {
        "shared_mlp": (rf"ci_fn\..+\.{last}$", rf"ci_fn\..+\.b{last[1:]}$"),  # site names hold dots
        "global_shared_mlp": (rf"ci_fn\.global\.{last}$", rf"ci_fn\.global\.b{last[1:]}$"),
        "global_shared_transformer": (r"ci_fn\.global\.out_proj\.w$", r"ci_fn\.global\.out_proj\.b$"),
    }.get(t)
    if out_layer and any(re.match(p, name) for p in out_layer):  # the output layer: its columns are the C logits
        return P(*([None] * (ndim - 1)), COMP)
    return P()


def source_spec(run: ResolvedRun, scope: str, shape: tuple[int, ...], components: int) -> P:
    """Persistent-PGD sources [scope lead, C(+1)] and their Adam moments: a per-position
    (bsc) source's batch axis over `data`; the channels over `components` when K divides
    them (C + 1 with the delta channel usually is not: replicated); shared scopes replicated."""
    lead = [DATA if (scope == "bsc" and i == 0) else None for i in range(len(shape) - 1)]
    return P(*lead, COMP if shape[-1] % components == 0 else None)


def _scope_of(run: ResolvedRun) -> dict[str, str]:
    out = {}
    for t in run.recon_terms:
        tc = run.cfg.loss_terms[t.index]
        if t.bundle is not None and isinstance(tc, PersistentPGDTerm):
            out[t.bundle] = tc.scope
    return out


def _key(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def leaf_spec(run: ResolvedRun, path: tuple, shape: tuple[int, ...], components: int) -> P:
    """The PartitionSpec of one leaf of `TrainState.to_tree()` by its key path."""
    keys = [_key(k) for k in path]
    for k in keys:  # params and the optax moments (mu, nu) carry the parameter's flat name
        if k.startswith(("components.", "ci_fn.")):
            return param_spec(run, k, len(shape))
    if keys and keys[0] in ("sources", "source_opt") and len(shape) >= 1:
        bundle = keys[1]
        return source_spec(run, _scope_of(run)[bundle], shape, components)
    return P()  # step, counts, injected hyper-parameters, the ascent's t


def state_specs(run: ResolvedRun, tree, components: int | None = None):
    """PartitionSpecs of a state tree (`TrainState.to_tree()`, arrays or ShapeDtypeStructs)."""
    k = run.cfg.runtime.mesh.components if components is None else components
    return jax.tree_util.tree_map_with_path(lambda p, x: leaf_spec(run, p, tuple(x.shape), k), tree)


def leaf_name(path) -> str:
    """`params.components.s.V` style name of a state leaf (for messages and the table)."""
    return ".".join(_key(k) for k in path)


def check_layout(run: ResolvedRun, tree, data: int, components: int) -> None:
    """Refuse (ValueError naming the leaf, its dimension and the axis size) a state the
    (data, components) mesh cannot lay out: a sharded dimension not divisible by its axis."""
    specs = state_specs(run, tree, components)
    sizes = {DATA: data, COMP: components}
    flat = list(zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P)),
                    strict=True))
    # the components are named first, then the other parameters, then moments and sources
    flat.sort(key=lambda item: (not leaf_name(item[0][0]).startswith("params.components."),
                                not leaf_name(item[0][0]).startswith("params.")))
    for (path, x), spec in flat:
        for dim, axis in enumerate(spec):
            if axis is not None and x.shape[dim] % sizes[axis]:
                raise ValueError(f"runtime.mesh.{axis}: the state leaf {leaf_name(path)} has {x.shape[dim]} along "
                                 f"dimension {dim} (shape {tuple(x.shape)}), not divisible by {axis} = {sizes[axis]}; "
                                 f"this state cannot be laid out on a data {data} x components {components} mesh")


def draw_spec(run: ResolvedRun, d: DrawSpec, components: int) -> P:
    """A draw: batch-shaped ones over `data`; its last axis over `components` when it is a
    site's C (mask sources, binomial noise) or C(+1) channels K divides."""
    lead = [DATA if (d.batched and i == 0) else None for i in range(len(d.shape))]
    site = _draw_site(run, d.name)
    if site is not None and d.shape and d.shape[-1] in (site.C, n_channels(run.cfg, site.C)) \
            and d.shape[-1] % components == 0:
        lead[-1] = COMP
    return P(*lead)


def _draw_site(run: ResolvedRun, name: str):
    for s in run.sites:
        if name == f"binomial.{s.name}" or name.endswith((f".{s.name}.source", f".{s.name}.pgd_init")):
            return s
    return None


class Placement:
    """Puts host arrays on the mesh as global arrays (each process transfers only the
    shards of its own devices): a batch over `data`, draws by `draw_spec`, a state by
    `state_specs`."""

    def __init__(self, run: ResolvedRun, mesh: Mesh):
        self.run, self.mesh = run, mesh
        self.components = mesh.shape[COMP]
        self.replicated = NamedSharding(mesh, P())

    def sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    def batch_sharding(self, ndim: int) -> NamedSharding:
        return self.sharding(P(DATA, *([None] * (ndim - 1))))

    def put(self, x, sharding: NamedSharding | None = None):
        """A host (or single-device) array as a global array of `sharding` (default: a batch)."""
        sharding = sharding or self.batch_sharding(np.ndim(x))
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        x = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    def put_draws(self, draws: dict, plan: list[DrawSpec], dtype) -> dict:
        specs = {d.name: draw_spec(self.run, d, self.components) for d in plan}
        return {k: self.put(np.asarray(v, dtype), self.sharding(specs.get(k, P()))) for k, v in draws.items()}

    def draw_shardings(self, plan: list[DrawSpec]) -> dict[str, NamedSharding]:
        return {d.name: self.sharding(draw_spec(self.run, d, self.components)) for d in plan}

    def state_shardings(self, tree):
        return jax.tree.map(self.sharding, state_specs(self.run, tree, self.components),
                            is_leaf=lambda s: isinstance(s, P))

    def put_tree(self, tree, shardings):
        return jax.tree.map(lambda x, s: self.put(x, s), tree, shardings)
