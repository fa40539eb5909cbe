"""metrics.jsonl, written by the loop for both backends (SPEC S100), and the divergence
guard's check of every step (S106).

Line `{"step": k, ...}` holds the metrics of training step k and/or the eval of the
parameters before step k. A backend's metrics may be lazy (JAX device arrays): lines are
queued and pulled to the host one log interval late, so an asynchronous device never waits
for the host; `flush` writes everything queued (before a checkpoint, at the end).

Every training step is queued too (`add_step`: its finite flag, lazy or None, and its
metrics), logged or not. A flush first checks the flags of the steps before its bound, in
one transfer, then writes the lines. At the first step k that is not finite: under
`guard.nonfinite: stop` the lines of steps < k are written, everything from k on is dropped
and `DivergenceError` names k, its term and its first non-finite gradient leaf; under
`skip` the backend has already left the state as it was, and the log counts the step and
warns (the first `WARN_FIRST` skipped steps, then every `WARN_EVERY`-th)."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contract.backend import nonfinite_metrics
from contract.errors import DivergenceError
from contract.metrics import ordered

WARN_FIRST = 10
WARN_EVERY = 100
GROUP_NORMS = ("grad_norm/components", "grad_norm/ci_fn")


def nonfinite_report(step: int, host: dict[str, float], order: dict[str, int]) -> str:
    """`step N: <term> = nan, first non-finite gradient <leaf> (norm nan)` from a step's host
    metrics: the first non-finite loss term (`loss/<i>.<type>`, else `loss/total`) and the
    first parameter (else group, else source) whose gradient norm is not finite."""
    bad = sorted(nonfinite_metrics(host), key=lambda n: order.get(n, len(order)))
    losses = [n for n in bad if n.startswith("loss/")]
    grads = [n for n in bad if n.startswith("grad_norm/")]
    term = next((n for n in losses if n != "loss/total"), losses[0] if losses else None)
    leaf = next((n for n in grads if n not in GROUP_NORMS), grads[0] if grads else None)
    t = f"{term} = {host[term]}" if term else "every loss finite"
    g = (f"first non-finite gradient {leaf.removeprefix('grad_norm/')} (norm {host[leaf]})" if leaf
         else "every gradient norm finite")
    return f"step {step}: {t}, {g}"


class MetricsLog:
    def __init__(self, path: Path | None, to_host, order: dict[str, int], wandb_run: Any = None,
                 nonfinite: str = "stop", warn: Callable[[str], None] | None = None):
        self.path = path
        self._to_host = to_host
        self._order = order
        self._wandb = wandb_run
        self._pending: list[tuple[int, dict]] = []
        self._steps: list[tuple[int, Any, dict]] = []  # (step, finite flag or None, metrics), not yet checked
        self._nonfinite = nonfinite  # guard.nonfinite (S106): "stop" | "skip"
        self._warn = warn
        self._file = open(path, "a") if path is not None else None  # None: check every step, write nothing (S113)
        self.last_train: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self.on_train_line: Callable[[dict[str, float]], None] | None = None  # callback(host train metrics), e.g. the progress bar
        # where the run stands when it stops at a non-finite step (the loop keeps it current)
        self.stop_note = "no checkpoint was written"
        # skipped steps (guard.nonfinite: skip): count, first and last step (the loop seeds them on resume)
        self.skipped: dict[str, int] = {}

    def add(self, step: int, line: dict) -> None:
        if line:
            self._pending.append((step, line))

    def add_step(self, step: int, metrics: dict, finite: Any = None) -> None:
        """Queue training step `step` for the guard (S106): `finite` is the backend's flag
        (lazy), or None to apply the rule to the host metrics here."""
        self._steps.append((step, finite, metrics))

    def flush(self, before: int | None = None, sync: bool = False) -> None:
        """Check the queued steps < `before` (all when None), then write the queued lines with
        step < `before`; `sync` also fsyncs. Raises DivergenceError (guard.nonfinite: stop)
        after writing the lines before the first non-finite step."""
        self._check(before)
        self._write(before)
        if sync and self._file is not None:
            os.fsync(self._file.fileno())

    def _write(self, before: int | None) -> None:
        ready = [p for p in self._pending if before is None or p[0] < before]
        self._pending = [p for p in self._pending if not (before is None or p[0] < before)]
        for k, line in ready:
            host = ordered(self._to_host(line), self._order)
            if self._file is not None:
                self._file.write(json.dumps({"step": k, **host}) + "\n")
            if self._wandb is not None:
                self._wandb.log(host, step=k)
            train = {n: v for n, v in host.items() if not n.startswith(("eval/", "warmup/"))}
            if train:
                self.last_train = train
                if self.on_train_line is not None:
                    self.on_train_line(train)
            ev = {n: v for n, v in host.items() if n.startswith("eval/")}
            if ev:
                self.last_eval = ev
        if self._file is not None:
            self._file.flush()

    def _check(self, before: int | None) -> None:
        todo = [s for s in self._steps if before is None or s[0] < before]
        if not todo:
            return
        self._steps = [s for s in self._steps if not (before is None or s[0] < before)]
        lazy = {str(i): f for i, (_, f, _) in enumerate(todo) if f is not None}
        flags = self._to_host(lazy) if lazy else {}  # one transfer for the lazy flags
        for i, (k, f, m) in enumerate(todo):
            host = self._to_host(m) if f is None else None
            if (not nonfinite_metrics(host)) if host is not None else bool(flags[str(i)]):
                continue
            if self._nonfinite == "stop":
                self._steps = []
                self._write(k)  # the lines of the steps before it; nothing from k on
                self._pending = []
                report = nonfinite_report(k, self._to_host(m) if host is None else host, self._order)
                raise DivergenceError(
                    f"training diverged at {report}; the run stopped there without saving ({self.stop_note}); "
                    "lower the learning rates or check the config, or set guard.nonfinite: skip to skip such steps")
            self._skip(k, m, host)

    def _skip(self, k: int, m: dict, host: dict | None) -> None:
        n = self.skipped.get("count", 0) + 1
        self.skipped = {"count": n, "first": self.skipped.get("first", k), "last": k}
        if self._warn is not None and (n <= WARN_FIRST or n % WARN_EVERY == 0):
            report = nonfinite_report(k, self._to_host(m) if host is None else host, self._order)
            more = f"; further warnings every {WARN_EVERY}th skip" if n == WARN_FIRST else ""
            self._warn(f"warning: skipped the update of {report} (guard.nonfinite: skip; {n} skipped so far{more})")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
