"""Backend by name, imported lazily (the oracle needs torch, the JAX trainer needs jax; a
process imports only the framework it runs)."""
from __future__ import annotations

from collections.abc import Callable

from contract.backend import Backend
from contract.config import ConfigError
from contract.resolve import ResolvedRun

BACKENDS = ("torch", "jax")


def make_backend(name: str, run: ResolvedRun) -> Backend:
    """The backend `name` ("torch" = the oracle, "jax" = the production trainer) for `run`."""
    if name == "torch":
        rt = run.cfg.runtime  # S93: JAX-only runtime fields, refused by the oracle
        if rt.mesh.components != 1:
            raise ConfigError("runtime.mesh.components: the torch oracle does not shard components over C (use 1; "
                              "the JAX trainer does)")
        if rt.remat != "off":
            raise ConfigError("runtime.remat: the torch oracle does not rematerialise forwards (use off)")
        from oracle_torch.backend import OracleBackend
        return OracleBackend(run)
    if name == "jax":  # float64 needs jax_enable_x64, set by the caller before JAX computes (loop/cli.py)
        from jax_impl.launch import join
        join(run)  # S146: one of several processes when the environment names them (before JAX starts)
        from jax_impl.backend import JaxBackend
        return JaxBackend(run)
    raise ValueError(f"backend: {name!r} is not one of {BACKENDS}")


def processes_launcher(name: str, run: ResolvedRun, processes: int | None = None
                       ) -> Callable[[list[str], str], int] | None:
    """`launch(argv, prog) -> exit code` when this command must start the run's processes
    itself (the oracle with runtime.mesh.data N > 1 outside a launcher, S110; the JAX trainer
    with `--processes P > 1` outside a launcher, S146), else None (this process trains). A
    half-set launcher environment or a launcher world size other than the config's (or
    `--processes`) is refused here (ValueError / ConfigError naming them)."""
    if name == "jax":
        from jax_impl import launch as jl
        if not jl.needs_launch(run, processes):
            return None
        p = processes if processes is not None else 1
        return lambda argv, prog: jl.launch(run, p, argv, prog)
    if name != "torch":
        return None
    from oracle_torch.launch import launch, needs_launch
    n = run.cfg.runtime.mesh.data
    if not needs_launch(n):
        return None
    return lambda argv, prog: launch(n, argv, prog)
