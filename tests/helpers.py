"""Helpers shared by the test modules: tiny targets, configs and runs (plain functions, no
framework imported at module level, so JAX-only and torch-only test modules both use them).
Backend-specific fixtures (a state and a model of the tiny TMS run) stay in each backend's
unit-test module."""
from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml
from safetensors.numpy import save_file

from contract.backend import Backend
from contract.config import parse_config
from contract.resolve import ResolvedRun, resolve_run
from contract.targets import REPO_ROOT

TINY_TMS_META = {"kind": "tms", "config": {"n_features": 5, "n_hidden": 2, "feature_probability": 0.05},
                 "training": {}}


def write_tiny_tms(d: Path, rng: str = "numpy") -> str:
    """A 5-feature, 2-hidden TMS target (non-square weights, tied as pretrained, float32 file)
    and its JSON in `d`; returns the weights path. `rng` draws the weights: "numpy"
    (`default_rng(1)`, the JAX tests) or "torch" (`torch.Generator` seeded 1, the oracle tests)."""
    if rng == "numpy":
        g = np.random.default_rng(1)
        w = g.standard_normal((2, 5)).astype(np.float32)
        b = (0.1 * g.standard_normal(5)).astype(np.float32)
    elif rng == "torch":
        import torch
        g = torch.Generator().manual_seed(1)
        w_t = torch.randn(2, 5, generator=g)
        w, b = w_t.numpy(), (0.1 * torch.randn(5, generator=g)).numpy()
    else:
        raise ValueError(f"rng must be 'numpy' or 'torch', not {rng!r}")
    path = Path(d) / "tms_tiny.safetensors"
    save_file({"linear1.weight": np.ascontiguousarray(w), "linear2.weight": np.ascontiguousarray(w.T),
               "linear2.bias": np.ascontiguousarray(b)}, str(path))
    (Path(d) / "tms_tiny.json").write_text(json.dumps(TINY_TMS_META))
    return str(path)


def tms_config(weights: str, **over) -> dict:
    """A small run on the tiny TMS target: two sites (C 4 and 3), mlp CI function,
    faithfulness + importance minimality + stochastic recon, 4 steps of batch 6."""
    d = {
        "seed": 0,
        "target": {"kind": "tms", "weights": weights},
        "sites": [{"pattern": "linear1", "C": 4}, {"pattern": "linear2", "C": 3}],
        "ci_fn": {"type": "mlp", "hidden": [4]},
        "output_loss": "mse",
        "loss_terms": [{"type": "faithfulness", "coeff": 1.0},
                       {"type": "importance_minimality", "coeff": 3e-3},
                       {"type": "stochastic_recon", "coeff": 1.0}],
        "optim": {"components": {"lr": {"start": 1e-3}}, "ci_fn": {"lr": {"start": 1e-3}}},
        "steps": 4,
        "batch_size": 6,
    }
    d.update(over)
    return d


def shipped_config(name: str) -> dict:
    """The dict of a shipped config, `configs/<name>.yaml`."""
    return yaml.safe_load((REPO_ROOT / "configs" / f"{name}.yaml").read_text())


def run_of(cfg: dict) -> ResolvedRun:
    """The resolved run of a config dict (the dict is not modified)."""
    return resolve_run(parse_config(copy.deepcopy(cfg)))


def write_cfg(path: Path, cfg: dict) -> str:
    """Write a config dict as YAML; returns the path."""
    Path(path).write_text(yaml.safe_dump(cfg))
    return str(path)


def read_metrics(out: Path) -> list[dict]:
    """Every line of a run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


class HookedBackend:
    """A backend (contract/backend.py) whose `train_step` calls `before(step)` and
    `after(step)` around the real one: faults injected into the training loop (a signal
    after a step, a crash inside one) without monkeypatching the loop. Every other member
    of the Backend protocol is the wrapped backend's (spelled out, so the type checker sees
    a Backend); anything else is reached through `__getattr__`."""

    def __init__(self, backend: Backend, before: Callable[[int], None] | None = None,
                 after: Callable[[int], None] | None = None):
        self._backend, self._before, self._after = backend, before, after
        self.name, self.prog, self.run = backend.name, backend.prog, backend.run
        self.primary = backend.primary

    def agree(self, flag):
        return self._backend.agree(flag)

    def barrier(self):
        self._backend.barrier()

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def train_step(self, state, step, batch, draws=None, probe=None):
        if self._before is not None:
            self._before(step)
        out = self._backend.train_step(state, step, batch, draws, probe)
        if self._after is not None:
            self._after(step)
        return out

    def new_state(self, init=None):
        return self._backend.new_state(init)

    def state_step(self, state):
        return self._backend.state_step(state)

    def faithfulness_warmup(self, state):
        return self._backend.faithfulness_warmup(state)

    def forward_terms(self, state, step, batch, draws, probe=None):
        return self._backend.forward_terms(state, step, batch, draws, probe)

    def evaluate(self, state, step):
        return self._backend.evaluate(state, step)

    def eval_metrics(self, state, batch, draws):
        return self._backend.eval_metrics(state, batch, draws)

    def ci_lower(self, state, batch):
        return self._backend.ci_lower(state, batch)

    def host_metrics(self, metrics):
        return self._backend.host_metrics(metrics)

    def export_state(self, state):
        return self._backend.export_state(state)

    def nonfinite_leaf(self, state):
        return self._backend.nonfinite_leaf(state)

    def list_checkpoints(self, out_dir):
        return self._backend.list_checkpoints(out_dir)

    def latest_checkpoint(self, out_dir):
        return self._backend.latest_checkpoint(out_dir)

    def load_checkpoint(self, path):
        return self._backend.load_checkpoint(path)

    def save_checkpoint(self, out_dir, state, step, extra):
        return self._backend.save_checkpoint(out_dir, state, step, extra)

    def clear_checkpoints(self, out_dir):
        return self._backend.clear_checkpoints(out_dir)

    def describe(self):
        return self._backend.describe()

    def close(self):
        return self._backend.close()


def signal_after(step: int, sig: int):
    """`after` hook of HookedBackend: send `sig` to this process after training step `step`."""
    import os

    def hook(k: int) -> None:
        if k == step:
            os.kill(os.getpid(), sig)
    return hook


def crash_at(step: int, message: str = "boom"):
    """`before` hook of HookedBackend: raise RuntimeError(message) when step `step` starts."""
    def hook(k: int) -> None:
        if k == step:
            raise RuntimeError(message)
    return hook


def hook_cli_backend(monkeypatch, before=None, after=None) -> None:
    """Make the CLIs (loop/cli.py) build HookedBackends around their real backend."""
    import loop.backends
    real = loop.backends.make_backend
    monkeypatch.setattr(loop.backends, "make_backend",
                        lambda name, run: HookedBackend(real(name, run), before, after))
