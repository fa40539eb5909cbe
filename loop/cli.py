"""The command line of both trainers, once: `vpd-oracle` (oracle_torch/cli.py) and
`vpd-train` (jax_impl/cli.py) are this parser bound to a backend.

    python -m oracle_torch.cli train CONFIG --out DIR [--no-resume] [--dtype float32|float64]
                                             [--steps N] [--wandb] [--quiet] [--threads N]
    python -m jax_impl.cli train CONFIG --out DIR [...the same...]

Overrides (--steps, --dtype) are written into the resolved config, so they are recorded in
every checkpoint and a resume under other overrides is refused with a diff. A config or
file problem prints one line `PROG: error: ...` and exits with code 2; an interrupted run
(SIGINT/SIGTERM) saves a checkpoint and exits with 128 + signal number; a second signal
aborts without saving (exit 130)."""
from __future__ import annotations

import argparse
import json
import signal
import sys

from contract import runlog
from contract.config import ConfigError

PROGS = {"torch": ("vpd-oracle", "the torch oracle"), "jax": ("vpd-train", "the JAX trainer")}


def parser(backend: str) -> argparse.ArgumentParser:
    prog, what = PROGS[backend]
    ap = argparse.ArgumentParser(prog=prog, description=f"Train a VPD decomposition with {what}.")
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train CONFIG into --out DIR (resumes from DIR's latest checkpoint)")
    t.add_argument("config", help="YAML run config (configs/*.yaml)")
    t.add_argument("--out", required=True, help="run directory: metrics.jsonl and checkpoints/")
    t.add_argument("--no-resume", action="store_true",
                   help="start afresh (clears DIR's old checkpoints and metrics) instead of resuming")
    t.add_argument("--dtype", choices=["float32", "float64"], help="override runtime.dtype")
    t.add_argument("--steps", type=int, help="override steps (recorded in the resolved config)")
    t.add_argument("--wandb", action="store_true",
                   help="log to Weights & Biases (WANDB_MODE respected; offline by default)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    if backend == "torch":
        t.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    return ap


def _error(prog: str, msg: str) -> int:
    print(f"{prog}: error: {runlog.one_line(msg)}", file=sys.stderr)
    return 2


def _prepare(backend: str, run, args) -> None:
    """Process-global framework settings, before the backend is built."""
    if backend == "jax" and run.cfg.runtime.dtype == "float64":
        import jax  # before any JAX computation (process-global flag)
        jax.config.update("jax_enable_x64", True)
    if backend == "torch" and getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)


def print_summary(summary: dict) -> None:
    if summary["start_step"] > 0:
        print(f"resumed from step {summary['start_step']}")
    fm = summary["final_metrics"]
    if fm:
        print(f"loss/total {fm['loss/total']:.6g} (last logged step)")
    if summary["final_eval"]:
        ev = {k: v for k, v in summary["final_eval"].items() if "/l0/" not in k}
        print("eval: " + json.dumps({k: round(v, 6) for k, v in ev.items()}))
    print(f"metrics: {summary['metrics_path']}")
    print(f"checkpoints: {summary['checkpoint_dir']} (latest: {summary['last_checkpoint']})")


def cmd_train(backend: str, args) -> int:
    from loop.backends import make_backend
    from loop.train import train

    prog = PROGS[backend][0]
    try:
        run = runlog.load_run(args.config, args.steps, args.dtype)
        _prepare(backend, run, args)
        summary = train(make_backend(backend, run), args.out, resume=not args.no_resume,
                        progress=not args.quiet, use_wandb=args.wandb)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        return _error(prog, str(e))
    except KeyboardInterrupt:
        print(f"{prog}: aborted (no checkpoint written by this interruption)", file=sys.stderr)
        return 130
    print_summary(summary)
    if summary["interrupted"]:
        print(f"interrupted by {summary['signal']} at step {summary['step']}; rerun the same command to resume",
              file=sys.stderr)
        return 128 + int(getattr(signal, summary["signal"]))
    return 0


def main(backend: str, argv: list[str] | None = None) -> int:
    args = parser(backend).parse_args(argv)
    if args.command == "train":
        return cmd_train(backend, args)
    return _error(PROGS[backend][0], f"unknown command {args.command!r}")
