"""vpd-train: train with the production JAX trainer. Mirror of oracle_torch/cli.py.

    python -m jax_impl.cli train CONFIG --out DIR [--no-resume] [--dtype float32|float64]
                                         [--steps N] [--wandb] [--quiet]

Overrides (--steps, --dtype) are written into the resolved config, so they are recorded in
every checkpoint and a resume under other overrides is refused with a diff. float64 turns on
`jax_enable_x64` before any JAX computation. A config or file problem prints one line
`vpd-train: error: ...` and exits with code 2; an interrupted run (SIGINT/SIGTERM) saves a
checkpoint and exits with 128 + signal number.
"""
from __future__ import annotations

from contract import runlog

import argparse
import json
import signal
import sys

PROG = "vpd-train"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="Train a VPD decomposition with the JAX trainer.")
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
    return ap


def _error(msg: str) -> int:
    print(f"{PROG}: error: {runlog.one_line(msg)}", file=sys.stderr)
    return 2


def load_run(config: str, steps: int | None = None, dtype: str | None = None):
    return runlog.load_run(config, steps, dtype, backend="jax")


def cmd_train(args) -> int:
    from contract.config import ConfigError

    try:
        run = load_run(args.config, args.steps, args.dtype)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        return _error(str(e))
    import jax

    if run.cfg.runtime.dtype == "float64":  # before any JAX computation (process-global flag)
        jax.config.update("jax_enable_x64", True)

    from jax_impl.train import train

    try:
        summary = train(run, args.out, resume=not args.no_resume, progress=not args.quiet, use_wandb=args.wandb)
    except (ConfigError, FileNotFoundError) as e:
        return _error(str(e))
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
    if summary["interrupted"]:
        print(f"interrupted by {summary['signal']} at step {summary['step']}; rerun the same command to resume",
              file=sys.stderr)
        return 128 + int(getattr(signal, summary["signal"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "train":
        return cmd_train(args)
    return _error(f"unknown command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
