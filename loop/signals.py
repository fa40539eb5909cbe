"""SIGINT/SIGTERM (SPEC S102). During the training loop (`StopRequested`) the first signal
asks the loop to stop after the current step (it then saves a checkpoint); a second one
aborts at once without saving, so the last good checkpoint stands. Around the whole command
(`AbortOnSignal`, installed by the CLI) a signal outside the loop's graceful window --
during setup, or after the loop -- and the loop's second signal end the process at once:
one line on stderr and `os._exit(130)`.

Why `os._exit` and not an exception: a KeyboardInterrupt raised by a second signal lands in
whatever the main thread is running. During a JAX checkpoint save that is inside orbax's
synchronous save, whose writer threads keep running while the exception unwinds; the
interpreter then shuts down under them and each logs a traceback ("cannot schedule new
futures after interpreter shutdown", "Event loop is closed"). `os._exit` runs no further
Python code in any thread: nothing half-written is renamed into place (both backends' saves
are atomic), the run directory's lock is released by the kernel (S104), and the last
complete checkpoint stands."""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Self

from contract.errors import EXIT_ABORTED

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def abort_now(prog: str, signum: int) -> None:
    """One line on stderr, then end the process at once with EXIT_ABORTED (no cleanup)."""
    try:
        print(f"\n{prog}: {signal.Signals(signum).name} received: aborted at once without saving; the last complete "
              "checkpoint stands (rerun the same command to resume)", file=sys.stderr, flush=True)
        sys.stdout.flush()
    finally:
        os._exit(EXIT_ABORTED)


class _Handlers:
    """Installs `_on_signal` for SIGINT/SIGTERM while entered (main thread only; elsewhere a
    no-op) and restores the previous handlers on exit."""

    def __init__(self, prog: str):
        self.prog = prog
        self._old: dict = {}

    def _on_signal(self, signum, frame) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._old[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, h in self._old.items():
            signal.signal(sig, h)
        self._old.clear()


class AbortOnSignal(_Handlers):
    """The CLI's handler for the command's lifetime: a signal reaching it aborts at once."""

    def _on_signal(self, signum, frame) -> None:
        abort_now(self.prog, signum)


class StopRequested(_Handlers):
    """The loop's handler: true once a first signal asked it to stop."""

    def __init__(self, prog: str):
        super().__init__(prog)
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name

    def _on_signal(self, signum, frame) -> None:
        if self.signum is not None:  # second signal: abort now, no save
            prev = self._old.get(signum)
            if callable(prev):  # the CLI's AbortOnSignal (or Python's SIGINT default): it decides how
                prev(signum, frame)
            raise KeyboardInterrupt  # library use without the CLI: unwind to the caller
        self.signum = signum
        print(f"\n{self.prog}: {signal.Signals(signum).name} received: stopping after this step and saving a "
              "checkpoint (send it again to abort without saving)", file=sys.stderr, flush=True)
