"""The oracle behind the backend interface (contract/backend.py) that the training loop
(loop/) and the tools (parity/, scripts/) drive. Mirror: jax_impl/backend.py."""
from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import torch

from contract.backend import NO_PROBE, Probe
from contract.checkpoint_meta import read_meta
from contract.metrics import term_key
from contract.resolve import ResolvedRun
from contract.schedules import hparams
from oracle_torch import checkpoint as ckpt
from oracle_torch.components import DecomposedModel
from oracle_torch.eval import eval_ci, eval_metrics, evaluate, to_torch_batch
from oracle_torch.state import TrainState, make_state, torch_dtype
from oracle_torch.train import draws_for_step, faithfulness_warmup, forward_terms, train_step


class OracleBackend:
    name = "torch"
    prog = "vpd-oracle"

    def __init__(self, run: ResolvedRun):
        self.run = run
        self.dtype = torch_dtype(run.cfg.runtime.dtype)
        self._model: DecomposedModel | None = None

    # ------------------------------------------------------------ state and step
    def model(self, state: TrainState) -> DecomposedModel:
        """The decomposed model bound to `state.params` (the oracle's modules hold the
        parameter dict itself, so a new state gets a new model)."""
        if self._model is None or self._model.params is not state.params:
            self._model = DecomposedModel(self.run, state.params, self.dtype)
        return self._model

    def new_state(self, init: dict[str, np.ndarray] | None = None) -> TrainState:
        return make_state(self.run, init, self.dtype)

    def state_step(self, state: TrainState) -> int:
        return state.step

    def faithfulness_warmup(self, state: TrainState) -> tuple[TrainState, list[float]]:
        return state, faithfulness_warmup(self.run, self.model(state), state.params)

    def batch(self, b: np.ndarray) -> torch.Tensor:
        return to_torch_batch(b, self.dtype)

    def draws(self, d: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {n: torch.as_tensor(a, dtype=self.dtype) for n, a in d.items()}

    def pins(self, probe: Probe | None) -> Probe:
        if probe is None:
            return NO_PROBE
        return Probe(probe.record, {n: torch.as_tensor(v) for n, v in probe.pins.items()})

    def train_step(self, state: TrainState, step: int, batch: np.ndarray, draws: dict | None = None,
                   probe: Probe | None = None) -> tuple[TrainState, dict]:
        if state.step != step:
            raise ValueError(f"train_step: the state is at step {state.step}, asked to run step {step}")
        if draws is None and self.run.cfg.runtime.draws == "contract":  # S131: the host-side plan, as parity feeds it
            from contract.draws import draw_plan, sample_numpy
            draws = sample_numpy(draw_plan(self.run), self.run.cfg.seed, step)
        d = draws_for_step(self.run, step, self.dtype) if draws is None else self.draws(draws)
        p = self.pins(probe)
        metrics = train_step(self.run, self.model(state), state, self.batch(batch), d, p)
        _to_numpy(p.record)
        return state, metrics

    def forward_terms(self, state: TrainState, step: int, batch: np.ndarray, draws: dict,
                      probe: Probe | None = None) -> dict[str, float]:
        p = self.pins(probe)
        params = state.params
        for v in params.values():
            v.grad = None
        leaves = {b: {n: s.detach().requires_grad_(True) for n, s in srcs.items()} for b, srcs in state.sources.items()}
        total, terms, _ = forward_terms(self.run, self.model(state), params, self.batch(batch), self.draws(draws),
                                        hparams(self.run.cfg, step), leaves, p)
        if p.record is not None:
            for t in self.run.recon_terms:  # S84 (3): each persistent term's gradient wrt its sources
                if t.source == "persistent_pgd":
                    lv = leaves[t.bundle]
                    key = term_key(t.index, self.run.cfg.loss_terms[t.index])
                    g = torch.autograd.grad(terms[key], list(lv.values()), retain_graph=True, allow_unused=True)
                    for n, gi in zip(lv, g, strict=True):
                        p.record[f"grad.sources.{t.bundle}.{n}"] = torch.zeros_like(lv[n]) if gi is None else gi
            total.backward()
            for n, v in params.items():
                p.record[f"grad.{n}"] = torch.zeros_like(v) if v.grad is None else v.grad.detach().clone()
                v.grad = None
            _to_numpy(p.record)
        out = {k: float(v.detach()) for k, v in terms.items()}
        out["total"] = float(total.detach())
        return out

    def evaluate(self, state: TrainState, step: int) -> dict:
        return evaluate(self.run, self.model(state), state.params, step, self.dtype)

    def eval_metrics(self, state: TrainState, batch: np.ndarray, draws: dict) -> dict[str, float]:
        return eval_metrics(self.run, self.model(state), state.params, self.batch(batch), self.draws(draws))

    def ci_lower(self, state: TrainState, batch: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            _, ci = eval_ci(self.run, self.model(state), state.params, self.batch(batch))
        return {k: v.numpy() for k, v in ci.items()}

    def host_metrics(self, metrics: dict) -> dict[str, float]:
        return {k: float(v) for k, v in metrics.items()}

    def export_state(self, state: TrainState) -> dict[str, np.ndarray]:
        return {n: t.numpy() for n, t in ckpt.state_tensors(state).items()}

    def nonfinite_leaf(self, state: TrainState) -> str | None:
        for n, t in ckpt.state_tensors(state).items():  # S106: the checkpoint's own tensors and names
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return n
        return None

    # ------------------------------------------------------------ checkpoints
    def list_checkpoints(self, out_dir: Path) -> list[Path]:
        return ckpt.list_checkpoints(out_dir)

    def latest_checkpoint(self, out_dir: Path) -> Path | None:
        return ckpt.latest_checkpoint(out_dir)

    def load_checkpoint(self, path: Path) -> tuple[TrainState, dict]:
        state = ckpt.load_checkpoint(path, self.run, self.dtype)  # verifies the digest first
        return state, dict(read_meta(path).get("extra") or {})

    def save_checkpoint(self, out_dir: Path, state: TrainState, step: int, extra: dict) -> Path:
        return ckpt.save_checkpoint(out_dir, state, self.run, step, self.run.cfg.checkpoint.keep, self.dtype, extra)

    def clear_checkpoints(self, out_dir: Path) -> None:
        ckpt.clear_checkpoints(out_dir)

    def describe(self) -> dict:
        return {"backend": self.name, "dtype": self.run.cfg.runtime.dtype, "torch": torch.__version__,
                "threads": torch.get_num_threads(), "platform": platform.platform()}

    def close(self) -> None:
        self._model = None


def _to_numpy(record: dict | None) -> None:
    """Tensors of a probe record as numpy arrays, in place (the tools read numpy)."""
    if record is None:
        return
    for k, v in record.items():
        if isinstance(v, torch.Tensor):
            record[k] = v.detach().cpu().numpy()
        elif isinstance(v, float | int):
            record[k] = np.asarray(v)
