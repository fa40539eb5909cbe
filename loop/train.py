"""The training loop, once, for any backend (SPEC S100-S103).

`train(backend, out_dir)` trains `backend.run` into `out_dir`:
- holds the run directory's lock for the whole run and refuses a directory of the other
  backend, before anything in it is touched (loop/rundir.py, S104);
- resumes from the newest intact checkpoint of `out_dir` (the backend verifies each against
  its digest, and refuses one written under another config, dtype or target); a damaged or
  incomplete newer one is skipped with one line on stderr and left on disk, and when every
  checkpoint is damaged the run stops (CheckpointError) instead of starting afresh over them
  (S107); `resume=False` starts afresh, clearing the old checkpoints and metrics of `out_dir`;
- runs the faithfulness warmup only on a fresh start (S44);
- writes metrics.jsonl (S100): line `{"step": k, ...}` holds the metrics of training step k
  (params before its update; every `log_every` steps and the last step) and the eval of the
  params before step k (every `eval.every` steps); a final line `{"step": steps, eval}`
  evaluates the trained params. On resume from a checkpoint at step k, lines with step >= k
  are dropped first, so the file matches an uninterrupted run (S101);
- checkpoints every `checkpoint.every` steps and at the end; SIGINT/SIGTERM stop the run
  between two steps and save a checkpoint at the current step, a second signal aborts at
  once without saving (S102);
- batches are `contract.data.batch_for_step(run, seed, k)` and production draws are keyed by
  (seed, step) inside the backend: a resumed run reproduces the uninterrupted one (S60, S50);
- runs as one process or as several cooperating ones (the oracle's data ranks, S113): each
  drives its own backend through this same loop; the primary one alone takes the lock, owns
  run.json, metrics.jsonl, wandb and the progress bar; stop requests are agreed on between
  steps, so every process stops at the same step and saves the same checkpoint together;
- guards against divergence (S106): every step's finite flag (lazy for JAX) is queued and
  checked whenever the metrics are flushed (log cadence, one interval late; before every
  checkpoint; at the end); the first non-finite step stops the run (DivergenceError, nothing
  from it on is logged or saved) or, under `guard.nonfinite: skip`, is counted (the backend
  left the state as it was); a checkpoint whose state holds a non-finite value is never saved.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from contract.backend import FINITE, Backend
from contract.checkpoint_digest import DamagedCheckpoint
from contract.config import ConfigError
from contract.data import batch_for_step
from contract.errors import CheckpointError, DivergenceError
from contract.init import init_state
from contract.metrics import metric_order
from contract.runlog import read_metric_lines, rewrite_metrics
from contract.schedules import hparams
from loop import rundir
from loop.metrics_log import MetricsLog
from loop.signals import StopRequested

CKPT_SUBDIR = "checkpoints"
SKIPPED = "skipped_nonfinite"  # the `extra` entry (S94) of the steps skipped under guard.nonfinite: skip (S106)


WandbMode = Literal["online", "offline", "disabled", "shared"]
# WANDB_MODE -> wandb.init(mode=...); "dryrun" and "run" are wandb's legacy spellings of offline / online
_WANDB_MODES: dict[str, WandbMode] = {"online": "online", "offline": "offline", "disabled": "disabled",
                                      "shared": "shared", "dryrun": "offline", "run": "online"}


def _wandb_mode() -> WandbMode:
    """The W&B mode named by the environment's WANDB_MODE (offline when unset)."""
    mode = os.environ.get("WANDB_MODE", "offline")
    if mode not in _WANDB_MODES:
        raise ConfigError(f"WANDB_MODE={mode!r} is not a W&B mode; use one of {', '.join(_WANDB_MODES)}")
    return _WANDB_MODES[mode]


def _wandb_start(backend: Backend, out: Path):
    import wandb

    cfg = backend.run.cfg
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "vpd"), dir=str(out),
                      mode=_wandb_mode(), config=cfg.to_dict(),
                      id=f"vpd-{backend.name}-{cfg.hash()}", resume="allow", name=out.name, reinit=True)


def train(backend: Backend, out_dir: str | Path, resume: bool = True, progress: bool = True,
          use_wandb: bool = False) -> dict:
    """Train `backend.run` into `out_dir` (see the module docstring); returns a summary.
    Before anything in `out_dir` is touched the run takes its lock and checks that it is
    this backend's directory (SPEC S104; RunDirLocked / RunDirError otherwise); the lock is
    held until the run ends, however it ends."""
    held = None
    if backend.primary:  # S113: the other processes of the run wait until the primary holds the directory
        held = rundir.claim(out_dir, backend.name, backend.run.cfg.hash(), fresh=not resume, prog=backend.prog)
    try:
        backend.barrier()
        return _train(backend, out_dir, resume, progress, use_wandb)
    finally:
        if held is not None:
            held.release()


def _train(backend: Backend, out_dir: str | Path, resume: bool, progress: bool, use_wandb: bool) -> dict:
    """The run itself, with the run directory claimed by `train`."""
    run = backend.run
    cfg = run.cfg
    if use_wandb:
        _wandb_mode()  # refuse a bad WANDB_MODE before anything in the directory is cleared or rewritten
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    t0 = time.perf_counter()

    # the newest intact checkpoint (S107), refused here, before anything is written, under another config
    ckpt, loaded = _resume_from(backend, out) if resume else (None, None)
    if not resume:
        backend.clear_checkpoints(out)
    if loaded is not None:
        state, extra = loaded
        start = backend.state_step(state)
    else:
        state, extra, start = backend.new_state(), {}, 0
    primary = backend.primary
    if primary:
        rewrite_metrics(metrics_path, read_metric_lines(metrics_path, start))
    if ckpt is None:
        state, warm = backend.faithfulness_warmup(state)
        if warm:
            extra["faithfulness_warmup"] = {"steps": len(warm), "first": warm[0], "last": warm[-1]}

    wb = _wandb_start(backend, out) if use_wandb and primary else None
    order = metric_order(run, init_state(run).keys())
    # every process checks every step (S106: the same global metrics, the same verdict); the primary writes
    log = MetricsLog(metrics_path if primary else None, backend.host_metrics, order, wb,
                     nonfinite=cfg.guard.nonfinite,
                     warn=(lambda msg: tqdm.write(f"{backend.prog}: {msg}", file=sys.stderr)) if primary else None)
    log.skipped = dict(extra.get(SKIPPED, {}))  # S106: skipped steps travel through the checkpoints
    pbar = tqdm(total=cfg.steps, initial=start, disable=not progress or not primary, desc=backend.prog,
                dynamic_ncols=True)
    log.on_train_line = lambda m: pbar.set_postfix(loss=f"{m['loss/total']:.4g}", refresh=False)
    ck_every, ev_every = cfg.checkpoint.every, cfg.eval.every
    saved_at = start if ckpt is not None else None
    last_ckpt = ckpt
    if ckpt is not None:
        log.stop_note = f"the last good checkpoint is {ckpt}"

    def save(step: int) -> Path:
        # the metrics of every saved step are on disk before its checkpoint; the flush checks
        # every step before `step` (S106: DivergenceError at the first non-finite one)
        log.flush(sync=True)
        if log.skipped:
            extra[SKIPPED] = dict(log.skipped)
        bad = backend.nonfinite_leaf(state)  # S106: a checkpoint never holds a NaN or an infinity
        if bad is not None:
            raise DivergenceError(
                f"training diverged: the state after step {step - 1} holds a non-finite value in {bad}; checkpoint "
                f"step {step} was not written ({log.stop_note}); lower the learning rates or check the config")
        path = backend.save_checkpoint(out, state, step, extra)
        log.stop_note = f"the last good checkpoint is {path}"
        return path

    k = start
    interrupted = False
    try:
        with StopRequested(backend.prog) as stop:
            while k < cfg.steps:
                if backend.agree(bool(stop)):  # S113: every process stops before the same step
                    interrupted = True
                    break
                line: dict = {}
                if ev_every and k % ev_every == 0:
                    line |= backend.evaluate(state, k)
                state, m = backend.train_step(state, k, batch_for_step(run, cfg.seed, k))
                log.add_step(k, m, m.pop(FINITE, None))  # every step, for the guard (S106)
                log_now = k % cfg.log_every == 0 or k == cfg.steps - 1
                if log_now:
                    # schedule values: the exact host numbers (S40)
                    line |= m | {f"sched/{n}": v for n, v in hparams(cfg, k).items()}
                if k == 0 and "faithfulness_warmup" in extra:
                    fw = extra["faithfulness_warmup"]
                    line |= {"warmup/faithfulness_first": fw["first"], "warmup/faithfulness_last": fw["last"]}
                if log_now:  # pull the previous interval's lines and flags (long done) before queueing this one
                    log.flush(before=k - cfg.log_every + 1)
                log.add(k, line)
                k += 1
                pbar.update(1)
                if ck_every and k % ck_every == 0 and k < cfg.steps:
                    last_ckpt, saved_at = save(k), k
            interrupted = interrupted or backend.agree(bool(stop))  # a signal during the last step stops it too
            if not interrupted and ev_every:
                log.add(cfg.steps, backend.evaluate(state, cfg.steps))
            log.flush()
            if saved_at != k:
                last_ckpt, saved_at = save(k), k
            if log.skipped and primary:  # S106: the count, whatever the warnings' rate limit left out
                sk = log.skipped
                tqdm.write(f"{backend.prog}: warning: {sk['count']} training step(s) had a non-finite loss or gradient "
                           f"and were skipped (guard.nonfinite: skip; first step {sk['first']}, last step {sk['last']})",
                           file=sys.stderr)
    finally:
        try:  # a crash keeps the lines of the steps it completed (a resume drops those past its checkpoint)
            log.flush()
        except Exception:  # noqa: BLE001 - the device may be what failed; the original error propagates
            pass
        pbar.close()
        log.close()
        state = loaded = None  # noqa: F841 - freed while a rank's process group still lives (S113)
        backend.close()
        if wb is not None:
            wb.finish()
    return {
        "backend": backend.name,
        "start_step": start,
        "step": k,
        "steps": cfg.steps,
        "interrupted": interrupted,
        "signal": stop.name if stop.name or not interrupted else "SIGTERM",  # a process stopped by another's signal
        "final_metrics": log.last_train,
        "final_eval": log.last_eval,
        "metrics_path": str(metrics_path),
        "checkpoint_dir": str(out / CKPT_SUBDIR),
        "last_checkpoint": None if last_ckpt is None else str(last_ckpt),
        "config_hash": cfg.hash(),
        "skipped/nonfinite": log.skipped.get("count", 0),  # S106: steps whose update was skipped, whole run
        "seconds": time.perf_counter() - t0,
    }


def _resume_from(backend: Backend, out: Path) -> tuple[Path | None, tuple | None]:
    """(checkpoint, (state, extra)) of the newest checkpoint of `out` that loads, or (None,
    None) when `out` has none (S107). Checkpoints are tried newest first; each one that fails
    verification (CheckpointError) is reported on stderr, one line each, once an intact one
    is found, and stays on disk. When checkpoints exist and none is intact, CheckpointError:
    starting afresh would overwrite them. Any other refusal (another config: ConfigError)
    propagates at once."""
    skipped: list[tuple[Path, CheckpointError]] = []
    for ck in reversed(backend.list_checkpoints(out)):
        try:
            loaded = backend.load_checkpoint(ck)
        except CheckpointError as e:
            skipped.append((ck, e))
            continue
        for bad, e in skipped if backend.primary else []:
            print(f"{backend.prog}: warning: {_why(bad, e)}; resuming from {ck.name}", file=sys.stderr, flush=True)
        return ck, loaded
    if skipped:
        root = skipped[0][0].parent
        raise CheckpointError(f"no intact checkpoint to resume from in {root}: "
                              + "; ".join(_why(bad, e) for bad, e in skipped)
                              + "; nothing was overwritten: move them aside (or rerun with --no-resume, which deletes "
                                "them) to start afresh, or train into another --out")
    return None, None


def _why(path: Path, e: CheckpointError) -> str:
    """`checkpoint step_X is damaged (file: what)` on one line."""
    if isinstance(e, DamagedCheckpoint):
        return f"checkpoint {path.name} is {e.state} ({e.problem})"
    return " ".join(str(e).split())
