"""Fixtures shared between test modules. Loaded for every test module, JAX-only ones
included, so no framework is imported at module level (as in tests/helpers.py); fixture
names carry their backend (`torch_...`, `jax_...`)."""
from __future__ import annotations

import pytest

from contract.config import parse_config
from contract.resolve import resolve_run
from tests.helpers import tms_config, write_tiny_tms


@pytest.fixture(scope="module")
def jax_fast_compiles():
    """Compile JAX without XLA's optimisations for one test module (restored, and the compile
    caches cleared, afterwards): for tests whose properties (determinism, exact resume, file
    handling) do not depend on the optimisation level and whose time is mostly compiling.
    Use it with `pytestmark = pytest.mark.usefixtures("jax_fast_compiles")`."""
    import jax
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)
    jax.clear_caches()  # nothing compiled without optimisations outlives the module


@pytest.fixture
def torch_tms(tmp_path):
    """A tiny TMS run on the torch oracle in float64: (run, step-0 state, decomposed model)."""
    import torch

    from oracle_torch.components import DecomposedModel
    from oracle_torch.state import make_state

    run = resolve_run(parse_config(tms_config(write_tiny_tms(tmp_path, rng="torch"))))
    state = make_state(run, None, torch.float64)
    model = DecomposedModel(run, state.params, torch.float64)
    return run, state, model
