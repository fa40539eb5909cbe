"""metrics.jsonl, written by the loop for both backends (SPEC S100).

Line `{"step": k, ...}` holds the metrics of training step k and/or the eval of the
parameters before step k. A backend's metrics may be lazy (JAX device arrays): lines are
queued and pulled to the host one log interval late, so an asynchronous device never waits
for the host; `flush` writes everything queued (before a checkpoint, at the end)."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contract.metrics import ordered


class MetricsLog:
    def __init__(self, path: Path, to_host, order: dict[str, int], wandb_run: Any = None):
        self.path = path
        self._to_host = to_host
        self._order = order
        self._wandb = wandb_run
        self._pending: list[tuple[int, dict]] = []
        self._file = open(path, "a")
        self.last_train: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self.on_train_line: Callable[[dict[str, float]], None] | None = None  # callback(host train metrics), e.g. the progress bar

    def add(self, step: int, line: dict) -> None:
        if line:
            self._pending.append((step, line))

    def flush(self, before: int | None = None, sync: bool = False) -> None:
        """Write the queued lines with step < `before` (all when None); `sync` also fsyncs."""
        ready = [p for p in self._pending if before is None or p[0] < before]
        self._pending = [p for p in self._pending if not (before is None or p[0] < before)]
        for k, line in ready:
            host = ordered(self._to_host(line), self._order)
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
        self._file.flush()
        if sync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()
