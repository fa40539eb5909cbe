"""The command line of both trainers, once: `vpd-oracle` (oracle_torch/cli.py) and
`vpd-train` (jax_impl/cli.py) are this parser bound to a backend.

    python -m oracle_torch.cli train CONFIG --out DIR [--no-resume] [--dtype float32|float64]
                                             [--steps N] [--wandb] [--quiet] [--threads N]
    python -m jax_impl.cli train CONFIG --out DIR [...the same...]

Overrides (--steps, --dtype) are written into the resolved config, so they are recorded in
every checkpoint and a resume under other overrides is refused with a diff.

One error surface (SPEC S105; the table with what to do is README "Exit codes"): every
anticipated failure is one line `PROG: error: ...` on stderr naming the file, field or
directory, and its own exit code (contract/errors.py): config or input invalid 2, run
directory of the other backend 3, locked by another run 4, checkpoint damaged 5, diverged
6, disk full 7, out of memory 8, devices not matching the run 9. An interrupted run
(SIGINT/SIGTERM) saves a checkpoint and exits with 128 + signal number; a second signal,
or one outside the training loop, aborts at once without saving (130, no traceback:
loop/signals.py). Anything else is a bug: its traceback, one line asking to report it, 70."""
from __future__ import annotations

import argparse
import errno
import json
import os
import re
import signal
import sys
import traceback
from collections.abc import Iterator

from contract import errors as E, runlog
from contract.config import ConfigError, RunConfig
from loop.signals import AbortOnSignal

PROGS = {"torch": ("vpd-oracle", "the torch oracle"), "jax": ("vpd-train", "the JAX trainer")}


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the ValueError into a usage error, exit 2)."""
    n = int(text)
    if n < 1:
        raise ValueError(text)
    return n


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
        t.add_argument("--threads", type=_positive_int, help="torch intra-op threads (default: torch's choice)")
    if backend == "jax":
        t.add_argument("--processes", type=_positive_int,
                       help="start the run as P cooperating local processes, each with its share of the mesh's "
                            "devices (S146; several hosts: README)")
    return ap


def _error(prog: str, msg: str, code: int = E.EXIT_INPUT) -> int:
    print(f"{prog}: error: {runlog.one_line(msg)}", file=sys.stderr)
    return code


# ------------------------------------------------------------------ failures -> (exit code, one line)
_DISK_FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded"}
# the same conditions as text, for errors that arrive wrapped: orbax/tensorstore raise
# ValueError("RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']"),
# safetensors SafetensorError("... No space left on device (os error 28)")
_DISK_FULL_TEXT = {os.strerror(n): why for n, why in _DISK_FULL.items()}
_QUOTED_PATH = re.compile(r'(?:file|path|directory) "([^"]+)"')
_OOM_TEXT = ("out of memory", "not enough memory", "can't allocate memory", "cannot allocate memory")
_MESH = re.compile(r"^runtime\.mesh(\.data)?: .*\d+ devices requested")
_CONFIG_FIELD = re.compile(r"^(" + "|".join(map(re.escape, RunConfig.model_fields)) + r")(\.[\w.]+)?: ")


def _chain(e: BaseException) -> Iterator[BaseException]:
    """`e`, its causes and contexts, and the members of exception groups (each once)."""
    todo, seen = [e], set()
    while todo:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo += [c for c in (x.__cause__, x.__context__) if c is not None]
        if isinstance(x, BaseExceptionGroup):
            todo += list(x.exceptions)


def _disk_full(e: BaseException) -> tuple[str, str | None] | None:
    """(why, path or None) when `e` is (wraps) a full disk or an exceeded quota."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in _DISK_FULL:
            return _DISK_FULL[x.errno], None if x.filename is None else str(x.filename)
        for text, why in _DISK_FULL_TEXT.items():
            if text in str(x):
                m = _QUOTED_PATH.search(str(x))
                return why, m.group(1) if m else None
    return None


def _out_of_memory(e: BaseException) -> bool:
    for x in _chain(e):
        msg = str(x).lower()
        if isinstance(x, MemoryError) or type(x).__name__ == "OutOfMemoryError":  # torch's, without importing torch
            return True
        if isinstance(x, RuntimeError) and (any(t in msg for t in _OOM_TEXT)
                                            or ("resource_exhausted" in msg and "memory" in msg)):  # XLA
            return True
    return False


# gloo's words when the other end of a collective is gone (a rank died or was stopped)
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")


def _peer_lost(e: BaseException) -> bool:
    return any(isinstance(x, RuntimeError) and any(t in str(x) for t in _PEER_LOST) for x in _chain(e))


def _device_problem(e: BaseException) -> bool:
    # jax_impl/mesh.py raises ValueError("runtime.mesh: data D x components K = N devices requested, M available ...");
    # JAX raises RuntimeError("Unable to initialize backend ...") for a platform it cannot start
    return (isinstance(e, ValueError) and bool(_MESH.match(str(e)))) or \
        (isinstance(e, RuntimeError) and "Unable to initialize backend" in str(e))


def _short(e: BaseException, n: int = 300) -> str:
    msg = runlog.one_line(str(e)) if str(e).strip() else ""
    msg = msg if len(msg) <= n else msg[:n] + "…"
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def classify(e: Exception, out: str | None = None, phase: str = "train") -> tuple[int, str]:
    """(exit code, message) of a failure of the train command (contract/errors.py). `phase`
    is "setup" (reading the config, the target and the data; building the backend) or
    "train" (the loop: run directory, resume, steps, checkpoints). EXIT_BUG = not anticipated."""
    if isinstance(e, E.VPDError):
        return e.exit_code, str(e)
    full = _disk_full(e)
    if full is not None:
        why, path = full
        where = path or (f"into the run directory {out}" if out else "a file")
        return E.EXIT_DISK_FULL, (f"disk full: {why} while writing {where}; free space on that file system and rerun the "
                                  "same command (it resumes from the last complete checkpoint, which is intact)")
    if _out_of_memory(e):
        when = " while setting up the run" if phase == "setup" else ""
        return E.EXIT_OUT_OF_MEMORY, (f"out of memory{when} ({_short(e, 200)}); lower batch_size / eval.batch_size / "
                                      "the components' C, or use a machine or device with more memory")
    if _peer_lost(e):
        return E.EXIT_DEVICE, ("lost the connection to another process of this run (it died or was stopped; its own "
                               "error says why); rerun the same command to resume from the last checkpoint")
    if _device_problem(e):
        return E.EXIT_DEVICE, f"{runlog.one_line(str(e))} (the devices this process sees do not match the run)"
    if isinstance(e, ConfigError):
        return E.EXIT_INPUT, str(e)
    if isinstance(e, FileNotFoundError | ValueError) and phase == "train" and str(e).startswith("checkpoint "):
        # the checkpoint loaders' own checks (until they raise CheckpointError)
        return E.EXIT_CHECKPOINT, (f"{runlog.one_line(str(e))} (damaged or unreadable checkpoint: move it aside to "
                                   "resume from the one before, or start afresh with --no-resume / another --out)")
    if isinstance(e, OSError):  # a path named on the command line or in the config cannot be used
        return E.EXIT_INPUT, str(e)
    if isinstance(e, ValueError) and (phase == "setup" or _CONFIG_FIELD.match(str(e))):
        return E.EXIT_INPUT, str(e)  # a refused input: the config's field, a target or data file
    return E.EXIT_BUG, _short(e)


def _fail(prog: str, e: Exception, out: str | None, phase: str) -> int:
    code, msg = classify(e, out, phase)
    if code == E.EXIT_BUG:
        traceback.print_exception(e, file=sys.stderr)
        msg = (f"internal error ({msg}): this is a bug; please report it with the traceback above, the command "
               "line and the config")
    return _error(prog, msg, code)


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


def cmd_train(backend: str, args, argv: list[str]) -> int:
    from loop.backends import make_backend, processes_launcher
    from loop.train import train

    prog = PROGS[backend][0]
    # a signal outside the loop's graceful window (setup, after the loop) and the loop's
    # second signal abort at once: exit 130, no traceback (loop/signals.py)
    with AbortOnSignal(prog):
        phase = "setup"
        try:
            run = runlog.load_run(args.config, args.steps, args.dtype)
            launch = processes_launcher(backend, run, getattr(args, "processes", None))
            if launch is not None:  # S110: this command starts the run's processes, each running argv
                return launch(argv, prog)
            _prepare(backend, run, args)
            be = make_backend(backend, run)
            phase = "train"
            summary = train(be, args.out, resume=not args.no_resume, progress=not args.quiet, use_wandb=args.wandb)
        except KeyboardInterrupt:  # only where the handlers cannot be installed (not the main thread)
            print(f"{prog}: aborted (no checkpoint written by this interruption)", file=sys.stderr)
            return E.EXIT_ABORTED
        except Exception as e:  # noqa: BLE001 - every failure becomes one line and its exit code (S105)
            return _fail(prog, e, args.out, phase)
        if be.primary:
            print_summary(summary)
        if summary["interrupted"]:
            if be.primary:
                print(f"interrupted by {summary['signal']} at step {summary['step']}; rerun the same command to resume",
                      file=sys.stderr)
            return 128 + int(getattr(signal, summary["signal"]))
        return E.EXIT_OK


def main(backend: str, argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser(backend).parse_args(argv)
    if args.command == "train":
        return cmd_train(backend, args, argv)
    return _error(PROGS[backend][0], f"unknown command {args.command!r}")
