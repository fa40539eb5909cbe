"""Backend by name, imported lazily (the oracle needs torch, the JAX trainer needs jax; a
process imports only the framework it runs)."""
from __future__ import annotations

from contract.backend import Backend
from contract.resolve import ResolvedRun

BACKENDS = ("torch", "jax")


def make_backend(name: str, run: ResolvedRun) -> Backend:
    """The backend `name` ("torch" = the oracle, "jax" = the production trainer) for `run`."""
    if name == "torch":
        from oracle_torch.backend import OracleBackend
        return OracleBackend(run)
    if name == "jax":  # float64 needs jax_enable_x64, set by the caller before JAX computes (loop/cli.py)
        from jax_impl.backend import JaxBackend
        return JaxBackend(run)
    raise ValueError(f"backend: {name!r} is not one of {BACKENDS}")
