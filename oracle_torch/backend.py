"""The oracle behind the backend interface (contract/backend.py) that the training loop
(loop/) and the tools (parity/, scripts/) drive. Mirror: jax_impl/backend.py.

With `runtime.mesh.data: N` the backend is one of N data ranks (oracle_torch/ranks.py,
S108): it joins the launcher's process group when built, takes this rank's rows of every
training batch and batched draw (the arrays handed to it are the global ones), and its
metrics, exports and records are global values, the same on every rank. Eval runs the
whole eval batch on every rank."""
from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import torch

from contract.backend import NO_PROBE, Probe
from contract.checkpoint_meta import read_meta
from contract.draws import draw_plan
from contract.metrics import term_key
from contract.resolve import ResolvedRun
from contract.schedules import hparams
from oracle_torch import checkpoint as ckpt
from oracle_torch.components import DecomposedModel
from oracle_torch.eval import eval_ci, eval_metrics, evaluate, to_torch_batch
from oracle_torch.ranks import full, join, leave
from oracle_torch.state import TrainState, make_state, per_position, torch_dtype
from oracle_torch.train import draws_for_step, faithfulness_warmup, forward_terms, train_step, whole


class OracleBackend:
    name = "torch"
    prog = "vpd-oracle"

    def __init__(self, run: ResolvedRun):
        self.run = run
        self.dtype = torch_dtype(run.cfg.runtime.dtype)
        self.ranks = join(run.cfg.runtime.mesh.data)  # S108: this process's rank (ONE for mesh.data 1)
        self.primary = self.ranks.primary
        self._batched = {d.name for d in draw_plan(run) if d.batched}
        self._model: DecomposedModel | None = None
        self._bound: dict | None = None

    # ------------------------------------------------------------ state and step
    def model(self, state: TrainState) -> DecomposedModel:
        """The decomposed model bound to `state.params` (the oracle's modules hold the
        parameter dict itself, so a new state gets a new model). On N ranks it holds a dict
        of its own, into which each forward binds the gathered parameters (train.py `whole`)."""
        if self._model is None or self._bound is not state.params:
            params = dict(state.params) if self.ranks.sharded else state.params
            self._model, self._bound = DecomposedModel(self.run, params, self.dtype), state.params
        return self._model

    def new_state(self, init: dict[str, np.ndarray] | None = None) -> TrainState:
        return make_state(self.run, init, self.dtype, self.ranks)

    # ------------------------------------------------------------ ranks (S108)
    def agree(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on any."""
        return self.ranks.any(flag)

    def barrier(self) -> None:
        self.ranks.barrier()

    def state_step(self, state: TrainState) -> int:
        return state.step

    def faithfulness_warmup(self, state: TrainState) -> tuple[TrainState, list[float]]:
        return state, faithfulness_warmup(self.run, self.model(state), state)

    def batch(self, b: np.ndarray) -> torch.Tensor:
        return to_torch_batch(b, self.dtype)

    def draws(self, d: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {n: torch.as_tensor(a, dtype=self.dtype) for n, a in d.items()}

    def train_batch(self, b: np.ndarray) -> torch.Tensor:
        """This rank's rows of a global training batch (S108)."""
        return self.batch(b[self.ranks.rows(len(b))] if self.ranks.sharded else b)

    def train_draws(self, d: dict) -> dict[str, torch.Tensor]:
        """This rank's rows of every batched draw of a step; replicated draws whole (S108)."""
        d = {n: torch.as_tensor(a, dtype=self.dtype) for n, a in d.items()}
        if self.ranks.sharded:
            d = {n: a[self.ranks.rows(a.shape[0])] if n in self._batched else a for n, a in d.items()}
        return d

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
        d = self.train_draws(draws_for_step(self.run, step, self.dtype) if draws is None else draws)
        p = self.pins(probe)
        metrics = train_step(self.run, self.model(state), state, self.train_batch(batch), d, p)
        _to_numpy(p.record)
        return state, metrics

    def forward_terms(self, state: TrainState, step: int, batch: np.ndarray, draws: dict,
                      probe: Probe | None = None) -> dict[str, float]:
        p = self.pins(probe)
        if self.ranks.sharded and p.pins:
            raise ValueError("forward_terms: stage pins are a one-process tool; use runtime.mesh.data: 1")
        for v in state.params.values():
            v.grad = None
        leaves = {b: {n: s.detach().requires_grad_(True) for n, s in srcs.items()} for b, srcs in state.sources.items()}
        model = self.model(state)

        def terms_of(params):
            total, terms, _ = forward_terms(self.run, model, params, self.train_batch(batch), self.train_draws(draws),
                                            hparams(self.run.cfg, step), leaves, p, self.ranks)
            if p.record is not None:
                for t in self.run.recon_terms:  # S84 (3): each persistent term's gradient wrt its sources
                    if t.source == "persistent_pgd":
                        self._record_source_grads(p.record, t, terms, leaves[t.bundle])
            return total, terms

        total, terms = whole(state, model, terms_of)
        if p.record is not None:
            total.backward()
            for n, v in state.params.items():
                p.record[f"grad.{n}"] = torch.zeros_like(full(v)) if v.grad is None else full(v.grad).detach().clone()
                v.grad = None
            _to_numpy(p.record)
        out = {k: float(v.detach()) for k, v in terms.items()}
        out["total"] = float(total.detach())
        return out

    def _record_source_grads(self, record: dict, t, terms: dict, lv: dict) -> None:
        """The global gradient of persistent term `t` wrt each of its sources, whole (S109)."""
        key = term_key(t.index, self.run.cfg.loss_terms[t.index])
        g = torch.autograd.grad(terms[key], list(lv.values()), retain_graph=True, allow_unused=True)
        rows = per_position(self.run, t.bundle)
        for n, gi in zip(lv, g, strict=True):
            gi = torch.zeros_like(lv[n]) if gi is None else self.ranks.source_grad(gi, rows)
            record[f"grad.sources.{t.bundle}.{n}"] = self.ranks.gather_rows(gi) if rows else gi

    def evaluate(self, state: TrainState, step: int) -> dict:
        model = self.model(state)
        return whole(state, model, lambda params: evaluate(self.run, model, params, step, self.dtype))

    def eval_metrics(self, state: TrainState, batch: np.ndarray, draws: dict) -> dict[str, float]:
        model = self.model(state)
        return whole(state, model, lambda params: eval_metrics(self.run, model, params, self.batch(batch),
                                                               self.draws(draws)))

    def ci_lower(self, state: TrainState, batch: np.ndarray) -> dict[str, np.ndarray]:
        model = self.model(state)
        with torch.no_grad():
            _, ci = whole(state, model, lambda params: eval_ci(self.run, model, params, self.batch(batch)))
        return {k: v.numpy() for k, v in ci.items()}

    def host_metrics(self, metrics: dict) -> dict[str, float]:
        return {k: float(v) for k, v in metrics.items()}

    def export_state(self, state: TrainState) -> dict[str, np.ndarray]:
        return {n: full(t).numpy() for n, t in ckpt.state_tensors(state).items()}

    def nonfinite_leaf(self, state: TrainState) -> str | None:
        for n, t in ckpt.state_tensors(state).items():  # S106: the checkpoint's own tensors and names
            if t.is_floating_point() and not bool(torch.isfinite(full(t)).all()):  # whole: one verdict on every rank
                return n
        return None

    # ------------------------------------------------------------ checkpoints
    def list_checkpoints(self, out_dir: Path) -> list[Path]:
        return ckpt.list_checkpoints(out_dir)

    def latest_checkpoint(self, out_dir: Path) -> Path | None:
        return ckpt.latest_checkpoint(out_dir)

    def load_checkpoint(self, path: Path) -> tuple[TrainState, dict]:
        state = ckpt.load_checkpoint(path, self.run, self.dtype, self.ranks)  # verifies the digest first
        return state, dict(read_meta(path).get("extra") or {})

    def save_checkpoint(self, out_dir: Path, state: TrainState, step: int, extra: dict) -> Path:
        return ckpt.save_checkpoint(out_dir, state, self.run, step, self.run.cfg.checkpoint.keep, self.dtype, extra)

    def clear_checkpoints(self, out_dir: Path) -> None:
        if self.primary:
            ckpt.clear_checkpoints(out_dir)
        self.barrier()

    def describe(self) -> dict:
        return {"backend": self.name, "dtype": self.run.cfg.runtime.dtype, "torch": torch.__version__,
                "threads": torch.get_num_threads(), "ranks": self.ranks.world, "platform": platform.platform()}

    def close(self) -> None:
        self._model = self._bound = None
        if self.ranks.sharded:
            leave()


def _to_numpy(record: dict | None) -> None:
    """Tensors of a probe record as numpy arrays, in place (the tools read numpy)."""
    if record is None:
        return
    for k, v in record.items():
        if isinstance(v, torch.Tensor):
            record[k] = v.detach().cpu().numpy()
        elif isinstance(v, float | int):
            record[k] = np.asarray(v)
