"""The failures a run anticipates, and the exit code of each (framework-free; SPEC S105).

Code anywhere in the repository raises one of the `VPDError` classes below for a failure
the user can act on; `loop/cli.py` prints it as one line `PROG: error: ...` and exits with
its `exit_code`. A few failures arrive as standard exceptions and are mapped by the CLI to
the codes here as well: `ConfigError` and a missing input file (EXIT_INPUT), a full disk
(EXIT_DISK_FULL), `MemoryError` (EXIT_OUT_OF_MEMORY), a device-count / mesh mismatch
(EXIT_DEVICE). Anything else is a bug: traceback, a request to report it, EXIT_BUG.

`EXIT_CODES` is the table README "Exit codes" documents for users (a test keeps the two
in step)."""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # a VPDError without a more specific class (none is raised today)
EXIT_INPUT = 2  # config or input invalid (also argparse's usage errors)
EXIT_RUN_DIR_OWNED = 3  # the run directory belongs to the other backend / cannot be identified
EXIT_RUN_DIR_LOCKED = 4  # another live run holds the run directory's lock
EXIT_CHECKPOINT = 5  # a checkpoint is damaged or unreadable
EXIT_DIVERGED = 6  # training diverged (non-finite loss)
EXIT_DISK_FULL = 7  # no space left on the device / quota exceeded
EXIT_OUT_OF_MEMORY = 8  # out of (host or device) memory
EXIT_DEVICE = 9  # the devices do not match the run (mesh larger than the devices, no backend), or another process of the run was lost
EXIT_BUG = 70  # an unanticipated exception (EX_SOFTWARE): a bug to report
EXIT_ABORTED = 130  # a signal aborted the run at once, without saving (S102)
# 128 + n: stopped by signal n after the current step, checkpoint saved (S102; SIGTERM 143,
# SIGINT 130 -- the same number as an abort, both leave a resumable directory)

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "trained to the last step",
    EXIT_FAILED: "another anticipated failure",
    EXIT_INPUT: "config or input invalid",
    EXIT_RUN_DIR_OWNED: "run directory belongs to the other backend",
    EXIT_RUN_DIR_LOCKED: "run directory locked by another run",
    EXIT_CHECKPOINT: "checkpoint damaged or unreadable",
    EXIT_DIVERGED: "training diverged",
    EXIT_DISK_FULL: "disk full",
    EXIT_OUT_OF_MEMORY: "out of memory",
    EXIT_DEVICE: "devices or processes do not match the run",
    EXIT_BUG: "a bug",
    EXIT_ABORTED: "aborted by a signal",
}


class VPDError(Exception):
    """A failure the user can act on. The message names the file / field / directory and
    says what to do; `exit_code` is the CLI's exit status for it."""

    exit_code: int = EXIT_FAILED


class RunDirError(VPDError):
    """The run directory cannot be used by this run: it belongs to the other backend, its
    owner cannot be told (no run.json and nothing identifiable), or it is not a directory
    (SPEC S104)."""

    exit_code = EXIT_RUN_DIR_OWNED


class RunDirLocked(RunDirError):
    """Another live process holds the run directory's lock (SPEC S104). `holder` is what
    the holder wrote into the lock file (pid, host, start time, program), when readable."""

    exit_code = EXIT_RUN_DIR_LOCKED

    def __init__(self, message: str, holder: dict | None = None):
        super().__init__(message)
        self.holder = holder or {}


class CheckpointError(VPDError):
    """A checkpoint that cannot be read back: missing or damaged files, a state that does
    not match its metadata."""

    exit_code = EXIT_CHECKPOINT


class DivergenceError(VPDError):
    """Training produced a non-finite loss; nothing past the last good checkpoint is saved."""

    exit_code = EXIT_DIVERGED


class DeviceError(VPDError):
    """The devices do not match the run (e.g. `runtime.mesh.data` larger than the devices
    the process sees)."""

    exit_code = EXIT_DEVICE
