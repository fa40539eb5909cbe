"""The JAX trainer behind the backend interface (contract/backend.py) that the training loop
(loop/) and the tools (parity/, scripts/) drive. Mirror: oracle_torch/backend.py.

Built once per run: the model (frozen weights on the device), the jitted step (`Stepper`)
and the jitted eval (`Evaluator`). Reuse one backend object to train the same run twice in
a process (a resume, a rerun) without recompiling. Metrics stay device arrays until
`host_metrics` (the loop pulls them one log interval late, so the device never waits).

A run may be several processes (jax.distributed, jax_impl/launch.py; S113, S146): each
builds this backend over the global mesh; process 0 is the primary; `agree` and `barrier`
are collectives over every process."""
from __future__ import annotations

import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from contract.backend import Probe
from contract.checkpoint_meta import read_meta
from contract.draws import draw_plan, sample_numpy
from contract.metrics import term_key
from contract.resolve import ResolvedRun
from jax_impl import checkpoint as ckpt
from jax_impl.components import DecomposedModel
from jax_impl.eval import Evaluator, eval_ci, to_jax_batch
from jax_impl.mesh import check_layout, serial as _serial
from jax_impl.state import TrainState, abstract_tree, jax_dtype, make_state
from jax_impl.train import Stepper, faithfulness_warmup, forward_terms


class JaxBackend:
    name = "jax"
    prog = "vpd-train"

    def agree(self, flag: bool) -> bool:
        if jax.process_count() == 1:
            return flag
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))

    def barrier(self) -> None:
        ckpt.sync("vpd-barrier")

    def __init__(self, run: ResolvedRun):
        self.run = run
        self.primary = jax.process_index() == 0  # S113: process 0 owns the run directory (True with one process)
        self.dtype = jax_dtype(run.cfg.runtime.dtype)
        self.model = DecomposedModel(run, self.dtype)
        self.stepper = Stepper(run, self.model, self.dtype)
        self.evaluator = Evaluator(run, self.model, self.dtype)
        if self.stepper.placement is not None:
            self.evaluator.on_mesh(self.stepper.placement)
        self._terms = None
        self._managers: dict[Path, ocp.CheckpointManager] = {}

    # ------------------------------------------------------------ state and step
    def new_state(self, init: dict[str, np.ndarray] | None = None) -> TrainState:
        m = self.run.cfg.runtime.mesh  # S145: a state the mesh cannot lay out is refused, sizes named
        check_layout(self.run, abstract_tree(self.run, self.dtype), m.data, m.components)
        return self.stepper.place_state(make_state(self.run, init, self.dtype))

    def state_step(self, state: TrainState) -> int:
        return int(jax.device_get(state.step))

    def faithfulness_warmup(self, state: TrainState) -> tuple[TrainState, list[float]]:
        params, losses = faithfulness_warmup(self.run, self.model, state.params)
        return self.stepper.place_state(state.replace(params=params)), losses

    def batch(self, b: np.ndarray):
        return self.stepper.put_batch(to_jax_batch(b, self.dtype))

    def train_step(self, state: TrainState, step: int, batch: np.ndarray, draws: dict | None = None,
                   probe: Probe | None = None) -> tuple[TrainState, dict]:
        if draws is None and self.run.cfg.runtime.draws == "contract":  # S131: the host-side plan, as parity feeds it
            draws = sample_numpy(draw_plan(self.run), self.run.cfg.seed, step)
        if draws is None:
            if probe is not None:
                raise ValueError("train_step: a probe needs explicit draws (the production step records nothing)")
            return _serial(self.stepper.step_with_key(state, self.batch(batch), step))
        p = None if probe is None else Probe(probe.record, {n: jnp.asarray(v) for n, v in probe.pins.items()})
        state, metrics = _serial(self.stepper.step_with_draws(state, self.batch(batch), draws, step, p))
        _to_numpy(None if probe is None else probe.record)
        return state, metrics

    def _terms_fn(self):
        """(jitted) terms and gradients of one batch without an update, with a probe."""
        if self._terms is None:
            run, model = self.run, self.model

            def f(params, sources, frozen, batch, draws, hp, pins):
                def loss(p, srcs):
                    rec: dict = {}
                    total, (terms, _) = forward_terms(run, model, frozen, p, batch, draws, hp, srcs, Probe(rec, pins))
                    return (total, terms), rec

                (total, terms), vjp, record = jax.vjp(loss, params, sources, has_aux=True)
                zeros = {k: jnp.zeros_like(v) for k, v in terms.items()}
                grads, _ = vjp((jnp.ones_like(total), zeros))
                record |= {f"grad.{n}": g for n, g in grads.items()}
                for t in run.recon_terms:  # S84 (3): each persistent term's gradient wrt its sources
                    if t.source == "persistent_pgd":
                        key = term_key(t.index, run.cfg.loss_terms[t.index])
                        _, g_src = vjp((jnp.zeros_like(total), zeros | {key: jnp.ones_like(terms[key])}))
                        record |= {f"grad.sources.{t.bundle}.{n}": g for n, g in g_src[t.bundle].items()}
                return total, terms, record

            self._terms = jax.jit(f)
        return self._terms

    def forward_terms(self, state: TrainState, step: int, batch: np.ndarray, draws: dict,
                      probe: Probe | None = None) -> dict[str, float]:
        pins = {} if probe is None else {n: jnp.asarray(v) for n, v in probe.pins.items()}
        pl = self.stepper.placement
        d = {n: jnp.asarray(a, self.dtype) for n, a in draws.items()} if pl is None else \
            pl.put_draws(draws, self.stepper.plan, self.dtype)
        total, terms, record = self._terms_fn()(state.params, state.sources, self.model.frozen, self.batch(batch), d,
                                                 self.stepper.hp(step), pins)
        if probe is not None and probe.record is not None:
            probe.record.update(record)
            _to_numpy(probe.record)
        out = {k: float(_host(v)) for k, v in terms.items()}
        out["total"] = float(_host(total))
        return out

    def evaluate(self, state: TrainState, step: int) -> dict:
        return _serial(self.evaluator.evaluate_device(state.params, step))

    def eval_metrics(self, state: TrainState, batch: np.ndarray, draws: dict) -> dict[str, float]:
        d = {n: jnp.asarray(a, self.dtype) for n, a in draws.items()}
        return self.host_metrics(self.evaluator.metrics(state.params, self.batch(batch), d))

    def ci_lower(self, state: TrainState, batch: np.ndarray) -> dict[str, np.ndarray]:
        _, ci = eval_ci(self.run, self.model, self.model.frozen, state.params, self.batch(batch))
        return {k: np.asarray(v) for k, v in jax.device_get(ci).items()}

    def host_metrics(self, metrics: dict) -> dict[str, float]:
        dev = {k: v for k, v in metrics.items() if not isinstance(v, int | float)}
        got = jax.device_get(dev)
        return {k: float(got[k]) if k in got else float(v) for k, v in metrics.items()}

    def export_state(self, state: TrainState) -> dict[str, np.ndarray]:
        tree = jax.tree.map(_host, state.to_tree())
        return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}

    def nonfinite_leaf(self, state: TrainState) -> str | None:
        # S106: one device reduction per floating leaf, one transfer of the verdicts
        named = [(_leaf_name(path), x) for path, x in jax.tree_util.tree_leaves_with_path(state.to_tree())
                 if jnp.issubdtype(x.dtype, jnp.inexact)]
        ok = _host(_all_finite([x for _, x in named]))
        return next((n for (n, _), f in zip(named, ok, strict=True) if not f), None)

    # ------------------------------------------------------------ checkpoints
    def _manager(self, out_dir: Path) -> ocp.CheckpointManager:
        out_dir = Path(out_dir).resolve()
        if out_dir not in self._managers:
            self._managers[out_dir] = ckpt.make_manager(out_dir, self.run.cfg.checkpoint.keep)
        return self._managers[out_dir]

    def list_checkpoints(self, out_dir: Path) -> list[Path]:
        return ckpt.list_checkpoints(out_dir)

    def latest_checkpoint(self, out_dir: Path) -> Path | None:
        return ckpt.latest_checkpoint(out_dir)

    def load_checkpoint(self, path: Path) -> tuple[TrainState, dict]:
        sh = self.stepper.state_shardings  # S145: restored onto this run's mesh, whatever mesh wrote it
        state = ckpt.load_checkpoint(path, self.run, self.dtype, None if sh is None else sh.to_tree())  # digest first
        return state, dict(read_meta(path).get("extra") or {})

    def save_checkpoint(self, out_dir: Path, state: TrainState, step: int, extra: dict) -> Path:
        return ckpt.save_checkpoint(out_dir, state, self.run, step, self.run.cfg.checkpoint.keep, self.dtype, extra,
                                    manager=self._manager(out_dir))

    def clear_checkpoints(self, out_dir: Path) -> None:
        self._close_manager(out_dir)
        ckpt.clear_checkpoints(out_dir)

    def _close_manager(self, out_dir: Path) -> None:
        m = self._managers.pop(Path(out_dir).resolve(), None)
        if m is not None:
            m.close()

    def describe(self) -> dict:
        return {"backend": self.name, "dtype": self.run.cfg.runtime.dtype, "jax": jax.__version__,
                "devices": [str(d) for d in jax.devices()], "processes": jax.process_count(),
                "mesh": {"data": self.run.cfg.runtime.mesh.data, "components": self.run.cfg.runtime.mesh.components},
                "platform": platform.platform()}

    def close(self) -> None:
        for d in list(self._managers):
            self._close_manager(d)


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
    """Per leaf: every element finite."""
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def _host(x) -> np.ndarray:
    """A (global) array as a numpy array in every process (gathered when this process does
    not hold all of it)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _leaf_name(path) -> str:
    """A state leaf's dotted name: `components.<site>.V` for a parameter, `sources.<bundle>.<site>`,
    `opt_components.inner_state.0.mu.components.<site>.V` for a moment."""
    parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return ".".join(parts[1:] if parts[0] == "params" else parts)


def _to_numpy(record: dict | None) -> None:
    """Device arrays of a probe record as numpy arrays, in place (the tools read numpy)."""
    if record is None:
        return
    for k, v in record.items():
        record[k] = _host(v)
