"""`python -m oracle_torch.cli train CONFIG ...` with `runtime.mesh.data: N` (SPEC S110): a
thin wrapper that starts the N ranks on this machine through torch's own launcher
(`torch.distributed.run`, i.e. torchrun --standalone), each running the same command line.
Under a launcher already (RANK, WORLD_SIZE, ... set) the process is one of the ranks and
nothing is started here.

A SIGINT/SIGTERM to this command reaches every rank (torchrun passes it on): they stop
after the same step and save a checkpoint together (S102, S113); the command exits 128 + n.
When a rank fails, torchrun stops the others at once (no rank waits for a dead peer); the
wrapper then names the rank that failed first and exits with its exit code (or 128 + the
signal that killed it), after the rank's own one-line error."""
from __future__ import annotations

import os
import signal
import sys

from oracle_torch.ranks import check_launch_env


def needs_launch(n: int) -> bool:
    """Whether the ranks of a run with runtime.mesh.data `n` must be started here."""
    return n > 1 and not check_launch_env(n)


def launch(n: int, argv: list[str], prog: str, module: str = "oracle_torch.cli") -> int:
    """Run `python -m <module> *argv` (the oracle's CLI) as `n` local ranks; the exit code of the run."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default for several ranks, without its warning
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={n}", "--max-restarts=0",
                                         "--monitor-interval=0.2", "-m", module, *argv])
    try:
        run(args)
    except SignalException as e:  # SIGINT/SIGTERM to this command: torchrun passed it on to every rank (S102)
        name = signal.Signals(e.sigval).name
        print(f"{prog}: {name}: every rank stopped after the same step (see above for the checkpoint it saved); "
              "rerun the same command to resume", file=sys.stderr)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, code = first_failure(e.failures)
        how = f"exit code {code}" if code > 0 else f"killed by signal {-code}"
        print(f"{prog}: error: rank {rank} of {n} failed ({how}); the run stopped on every rank "
              f"(its error is above; rerun the same command to resume from the last checkpoint)", file=sys.stderr)
        return code if code > 0 else 128 - code
    return 0


def first_failure(failures: dict) -> tuple[int, int]:
    """(rank, exit code) of the rank whose failure stopped the run: one killed from outside
    (a signal other than the launcher's SIGTERM: its peers then fail on the lost connection),
    else one that exited with an error, else one the launcher stopped; earliest, lowest rank."""
    def order(item):
        rank, f = item
        killed, stopped = f.exitcode < 0 and f.exitcode != -signal.SIGTERM, f.exitcode == -signal.SIGTERM
        return (not killed, stopped, f.timestamp, rank)
    rank, f = min(failures.items(), key=order)
    return rank, f.exitcode
