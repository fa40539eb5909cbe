"""The narrow interface between the training loop / the tools and a backend (framework-free).

A backend (`oracle_torch/backend.py`, `jax_impl/backend.py`) owns the math of one framework:
it makes or restores a training state, runs one step, evaluates, saves and loads
checkpoints. Everything around it (resume, run-directory bookkeeping, metrics.jsonl,
signals, eval and checkpoint cadence, progress, summary, wandb) is `loop/`, written once.
The parity harness and the scripts drive a backend through this interface too.

Arrays cross the interface as numpy (batches, draws, pins, exported parameters); the
training state stays the backend's own object (`TrainState` in each backend)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from contract.resolve import ResolvedRun


@dataclass(frozen=True)
class Probe:
    """Debugging hooks of one step, kept out of the production signatures' meaning: `record`
    (when a dict) receives named intermediates (`clean_out`, `site_input.*`, `ci_logits.*`,
    `ci_lower.*`, `ci_upper.*`, `route.*`, `mask.*`, `masked_out.*`, `term.*`, `grad.*`);
    `pins` maps the same names to arrays that replace the computed values (stage bundles)."""
    record: dict | None = None
    pins: dict = field(default_factory=dict)

    def pin(self, name: str, computed):
        """The pinned value of stage `name` if one is given, else `computed`."""
        return self.pins.get(name, computed)

    def put(self, name: str, value) -> None:
        if self.record is not None:
            self.record[name] = value


NO_PROBE = Probe()

# S106 -- the divergence guard. A step is finite when every metric it reports under these
# prefixes is: its losses (`loss/<i>.<type>`, `loss/total`) and its gradient norms
# (`grad_norm/<leaf>`, the group norms, the persistent sources'). Both backends and the loop
# apply this one rule.
GUARDED = ("loss/", "grad_norm/")
# The key under which a production step (`train_step` without draws) of a backend with lazy
# metrics reports the rule's verdict as a device scalar, so the loop checks every step without
# pulling its metrics; the loop removes it before anything is logged. The parity path
# (explicit draws) never carries it. A backend with host metrics may leave it out: the loop
# then applies `nonfinite_metrics` itself.
FINITE = "guard/finite"


def nonfinite_metrics(metrics: dict[str, float]) -> list[str]:
    """The guarded metrics (S106) of one step's host metrics that are not finite, in the
    order given."""
    return [k for k, v in metrics.items() if k.startswith(GUARDED) and not math.isfinite(v)]


class Backend(Protocol):
    """What the loop and the tools call. `state` is the backend's TrainState."""

    name: str  # "torch" | "jax"
    prog: str  # the CLI's program name (progress bar, messages)
    run: ResolvedRun  # resolved, with runtime.dtype set
    # S113: a run may be several cooperating processes (the oracle's data ranks), each
    # driving its own backend object through the same loop; `primary` is the one that owns
    # the run directory (lock, run.json, metrics.jsonl, wandb, progress) -- True in a
    # one-process run
    primary: bool

    def agree(self, flag: bool) -> bool:
        """True in every process of the run when `flag` is True in any (a collective; the
        flag itself in a one-process run)."""
        ...

    def barrier(self) -> None:
        """Wait until every process of the run got here (nothing in a one-process run)."""
        ...

    def new_state(self, init: dict[str, np.ndarray] | None = None) -> Any:
        """The state of step 0 from the initial arrays (flat names, contract/init.py;
        None = `init_state(run)`)."""
        ...

    def state_step(self, state: Any) -> int:
        """The number of training steps the state has taken."""
        ...

    def faithfulness_warmup(self, state: Any) -> tuple[Any, list[float]]:
        """S44: the faithfulness warmup on a fresh state; (state, losses)."""
        ...

    def train_step(self, state: Any, step: int, batch: np.ndarray, draws: dict[str, np.ndarray] | None = None,
                   probe: Probe | None = None) -> tuple[Any, dict]:
        """Training step `step` (S30). `draws` None = production (sampled by the backend);
        else the draw plan's arrays (parity). Metrics may be lazy (device values): pass them
        through `host_metrics` to read them; lazy production metrics also hold `FINITE`
        (S106). Under `guard.nonfinite: skip` a step that is not finite leaves the state as it
        was, but for its step counter."""
        ...

    def forward_terms(self, state: Any, step: int, batch: np.ndarray, draws: dict[str, np.ndarray],
                      probe: Probe | None = None) -> dict[str, float]:
        """The loss terms of `state` on one batch without an update ({term_key: value, "total": ...});
        `probe.record` also receives `grad.<leaf>` of the total (and of each persistent
        term with respect to its sources)."""
        ...

    def evaluate(self, state: Any, step: int) -> dict:
        """The eval metrics of the loop's eval at `step` (possibly lazy)."""
        ...

    def eval_metrics(self, state: Any, batch: np.ndarray, draws: dict[str, np.ndarray]) -> dict[str, float]:
        """Every eval metric of `state` on one eval batch with explicit eval draws (the arrays
        of `eval_draw_plan`, parity mode): `eval/l0/*`, `eval/<mse|kl|ce>/*` and, with
        `eval.pgd_steps > 0`, `eval/pgd/*` (S88). Host floats."""
        ...

    def ci_lower(self, state: Any, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The eval's deterministic ci_lower of a batch, per site (tools: parity/tms_recovery.py)."""
        ...

    def host_metrics(self, metrics: dict) -> dict[str, float]:
        """Metrics as Python floats (waits for the device)."""
        ...

    def export_state(self, state: Any) -> dict[str, np.ndarray]:
        """Every tensor of the state by its flat checkpoint name (contract/layout.py)."""
        ...

    def nonfinite_leaf(self, state: Any) -> str | None:
        """The name of the first tensor of the state (parameters, optimizer moments, sources
        and their ascent state) holding a NaN or an infinity; None when all are finite. The
        loop asks before every checkpoint it saves (S106)."""
        ...

    def list_checkpoints(self, out_dir: Path) -> list[Path]:
        """Every checkpoint dir of `out_dir` (`checkpoints/step_XXXXXXXX`), oldest first,
        complete or not: the loop's resume loads them newest first (S107)."""
        ...

    def latest_checkpoint(self, out_dir: Path) -> Path | None:
        """The newest complete checkpoint of `out_dir` (not verified), or None."""
        ...

    def load_checkpoint(self, path: Path) -> tuple[Any, dict]:
        """(state, extra) of a checkpoint; its files are verified against its digest first
        (CheckpointError naming the file and the step, S107); refused under another
        config/dtype/target (ConfigError)."""
        ...

    def save_checkpoint(self, out_dir: Path, state: Any, step: int, extra: dict) -> Path: ...

    def clear_checkpoints(self, out_dir: Path) -> None: ...

    def describe(self) -> dict:
        """Backend name, dtype, library versions, devices: for logs and summaries."""
        ...

    def close(self) -> None: ...
