"""Host-side run bookkeeping shared by both trainers' loops (framework-free): the dtype
override recorded in the resolved config, and the metrics.jsonl rewrite on resume."""
from __future__ import annotations

import json
import os
from pathlib import Path

from contract.config import ConfigError, parse_config
from contract.config_file import load_config
from contract.resolve import ResolvedRun, resolve_run


def with_dtype(run: ResolvedRun, name: str) -> ResolvedRun:
    """`run` with runtime.dtype set to `name`, so the override is recorded in the config."""
    if run.cfg.runtime.dtype == name:
        return run
    d = run.cfg.to_dict()
    d["runtime"]["dtype"] = name
    return resolve_run(parse_config(d, "dtype override"))


def read_metric_lines(path: Path, before_step: int) -> list[str]:
    """The lines of metrics.jsonl with step < before_step (a torn last line is dropped)."""
    keep = []
    if not path.is_file():
        return keep
    # undecodable bytes (a damaged file) become a line that fails to parse and is dropped
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] < before_step:
            keep.append(line)
    return keep


def rewrite_metrics(path: Path, lines: list[str]) -> None:
    """Atomically replace metrics.jsonl with `lines`."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def one_line(msg: str) -> str:
    """A multi-line error message folded into one line for a CLI."""
    parts = [p.strip() for p in str(msg).splitlines() if p.strip()]
    if not parts:
        return "unknown error"
    head, rest = parts[0], parts[1:]
    return head + (" " + "; ".join(rest) if rest else "")


def load_run(config: str, steps: int | None = None, dtype: str | None = None) -> ResolvedRun:
    """Load a config file, apply command-line overrides (recorded in the resolved config) and
    resolve it (raises ConfigError / FileNotFoundError / ValueError)."""
    d = load_config(config).to_dict()
    if steps is not None:
        if steps <= 0:
            raise ConfigError(f"--steps: must be a positive integer (got {steps})")
        d["steps"] = steps
    if dtype is not None:
        d["runtime"]["dtype"] = dtype
    return resolve_run(parse_config(d, f"{config} (with command-line overrides)"))
