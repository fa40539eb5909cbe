"""Data parallelism over a device mesh (SPEC S91). The step is one jitted function of the
GLOBAL batch; placing the batch (and every batch-shaped draw) sharded over the `data` axis
and everything else replicated lets XLA partition it. Because the program is written on
global arrays, the traps of hand-written data parallelism cannot occur: imp-min sums run
over the global batch before the log, shared-scope source gradients are gradients of the
global-mean loss, and replicated state stays replicated. Sharding components over C is
not implemented (refused in contract/resolve.py)."""
from __future__ import annotations

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P


def make_data_mesh(n: int):
    have = len(jax.devices())
    if n > have:
        raise ValueError(f"runtime.mesh.data: {n} devices requested, {have} available "
                         f"(on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX starts)")
    # Auto axes: XLA propagates the shardings through the step (no explicit-sharding types)
    return jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


class Placement:
    """Puts arrays on the mesh: leading axis = batch -> sharded over `data`, else replicated."""

    def __init__(self, mesh, batch_rows: int):
        self.mesh, self.batch_rows = mesh, batch_rows
        self.sharded = NamedSharding(mesh, P("data"))
        self.replicated = NamedSharding(mesh, P())

    def put(self, x):
        batched = getattr(x, "ndim", 0) >= 1 and x.shape[0] == self.batch_rows and self.batch_rows > 1
        return jax.device_put(x, self.sharded if batched else self.replicated)

    def put_tree(self, tree):
        return jax.tree.map(self.put, tree)

    def replicate(self, tree):
        return jax.device_put(tree, self.replicated)
