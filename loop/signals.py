"""Graceful stop on SIGINT/SIGTERM: the first signal asks the loop to stop after the current
step (it then saves a checkpoint); a second one aborts at once without saving, so the last
good checkpoint stands (SPEC S102)."""
from __future__ import annotations

import signal
import sys
import threading


class StopRequested:
    """Context manager installing the handlers (main thread only; elsewhere a no-op)."""

    def __init__(self, prog: str):
        self.prog = prog
        self.signum: int | None = None
        self._old: dict = {}

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name

    def _on_signal(self, signum, frame) -> None:
        if self.signum is not None:  # second signal: abort now, no save
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{self.prog}: {signal.Signals(signum).name} received: stopping after this step and saving a "
              "checkpoint (send it again to abort without saving)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequested:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, h in self._old.items():
            signal.signal(sig, h)
        self._old.clear()
