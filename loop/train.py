"""The training loop, once, for any backend (SPEC S100-S103).

`train(backend, out_dir)` trains `backend.run` into `out_dir`:
- resumes from the latest checkpoint of `out_dir` (the backend refuses one written under
  another config, dtype or target); `resume=False` starts afresh, clearing the old
  checkpoints and metrics of `out_dir`;
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
  (seed, step) inside the backend: a resumed run reproduces the uninterrupted one (S60, S50).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from contract.backend import Backend
from contract.data import batch_for_step
from contract.init import init_state
from contract.metrics import metric_order
from contract.runlog import read_metric_lines, rewrite_metrics
from contract.schedules import hparams
from loop.metrics_log import MetricsLog
from loop.signals import StopRequested

CKPT_SUBDIR = "checkpoints"


WandbMode = Literal["online", "offline", "disabled", "shared"]
# WANDB_MODE -> wandb.init(mode=...); "dryrun" and "run" are wandb's legacy spellings of offline / online
_WANDB_MODES: dict[str, WandbMode] = {"online": "online", "offline": "offline", "disabled": "disabled",
                                      "shared": "shared", "dryrun": "offline", "run": "online"}


def _wandb_mode() -> WandbMode:
    """The W&B mode named by the environment's WANDB_MODE (offline when unset)."""
    mode = os.environ.get("WANDB_MODE", "offline")
    if mode not in _WANDB_MODES:
        raise ValueError(f"WANDB_MODE={mode!r} is not a W&B mode; use one of {', '.join(_WANDB_MODES)}")
    return _WANDB_MODES[mode]


def _wandb_start(backend: Backend, out: Path):
    import wandb

    cfg = backend.run.cfg
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "vpd"), dir=str(out),
                      mode=_wandb_mode(), config=cfg.to_dict(),
                      id=f"vpd-{backend.name}-{cfg.hash()}", resume="allow", name=out.name, reinit=True)


def train(backend: Backend, out_dir: str | Path, resume: bool = True, progress: bool = True,
          use_wandb: bool = False) -> dict:
    """Train `backend.run` into `out_dir` (see the module docstring); returns a summary."""
    run = backend.run
    cfg = run.cfg
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    t0 = time.perf_counter()

    ckpt = backend.latest_checkpoint(out) if resume else None
    if not resume:
        backend.clear_checkpoints(out)
    if ckpt is not None:  # refused here, before anything is written, under another config
        state, extra = backend.load_checkpoint(ckpt)
        start = backend.state_step(state)
    else:
        state, extra, start = backend.new_state(), {}, 0
    rewrite_metrics(metrics_path, read_metric_lines(metrics_path, start))
    if ckpt is None:
        state, warm = backend.faithfulness_warmup(state)
        if warm:
            extra["faithfulness_warmup"] = {"steps": len(warm), "first": warm[0], "last": warm[-1]}

    wb = _wandb_start(backend, out) if use_wandb else None
    order = metric_order(run, init_state(run).keys())
    log = MetricsLog(metrics_path, backend.host_metrics, order, wb)
    pbar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc=backend.prog, dynamic_ncols=True)
    log.on_train_line = lambda m: pbar.set_postfix(loss=f"{m['loss/total']:.4g}", refresh=False)
    ck_every, ev_every = cfg.checkpoint.every, cfg.eval.every
    saved_at = start if ckpt is not None else None
    last_ckpt = ckpt

    def save(step: int) -> Path:
        log.flush(sync=True)  # the metrics of every saved step are on disk before its checkpoint
        return backend.save_checkpoint(out, state, step, extra)

    k = start
    try:
        with StopRequested(backend.prog) as stop:
            while k < cfg.steps and not stop:
                line: dict = {}
                if ev_every and k % ev_every == 0:
                    line |= backend.evaluate(state, k)
                state, m = backend.train_step(state, k, batch_for_step(run, cfg.seed, k))
                log_now = k % cfg.log_every == 0 or k == cfg.steps - 1
                if log_now:
                    # schedule values: the exact host numbers (S40)
                    line |= m | {f"sched/{n}": v for n, v in hparams(cfg, k).items()}
                if k == 0 and "faithfulness_warmup" in extra:
                    fw = extra["faithfulness_warmup"]
                    line |= {"warmup/faithfulness_first": fw["first"], "warmup/faithfulness_last": fw["last"]}
                if log_now:  # pull the previous interval's lines (long done) before queueing this one
                    log.flush(before=k)
                log.add(k, line)
                k += 1
                pbar.update(1)
                if ck_every and k % ck_every == 0 and k < cfg.steps:
                    last_ckpt, saved_at = save(k), k
            interrupted = bool(stop)
            if not interrupted and ev_every:
                log.add(cfg.steps, backend.evaluate(state, cfg.steps))
            log.flush()
            if saved_at != k:
                last_ckpt, saved_at = save(k), k
    finally:
        try:  # a crash keeps the lines of the steps it completed (a resume drops those past its checkpoint)
            log.flush()
        except Exception:  # noqa: BLE001 - the device may be what failed; the original error propagates
            pass
        pbar.close()
        log.close()
        backend.close()
        if wb is not None:
            wb.finish()
    return {
        "backend": backend.name,
        "start_step": start,
        "step": k,
        "steps": cfg.steps,
        "interrupted": interrupted,
        "signal": stop.name,
        "final_metrics": log.last_train,
        "final_eval": log.last_eval,
        "metrics_path": str(metrics_path),
        "checkpoint_dir": str(out / CKPT_SUBDIR),
        "last_checkpoint": None if last_ckpt is None else str(last_ckpt),
        "config_hash": cfg.hash(),
        "seconds": time.perf_counter() - t0,
    }
