"""Checkpoint metadata shared by both trainers (framework-free).

Each backend stores its tensors its own way (the oracle a safetensors file, JAX an orbax
item), but the metadata beside them is one JSON dict with the same keys in both:
`format`, `backend`, `step`, `config` (the resolved config, `cfg.to_dict()`),
`config_hash`, `dtype`, `target_sha256` (of the target weight file), backend-specific
entries (`param_order`; JAX also `prng_impl`), `versions`, `platform`, `date` and `extra`
(training-state notes such as the faithfulness-warmup losses), and `digest_file`, the name
of the checkpoint's commit marker (contract/checkpoint_digest.py; a meta without it predates
checkpoint digests).

A resume is refused, with a field-by-field diff, under another config, dtype or target
weight file (S94). The backends name their dtypes (`dtype_name`) and add their own
checks; the messages here are the ones both print.
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
from pathlib import Path

import numpy as np

from contract.checkpoint_digest import DIGEST_FILE, META_DIGEST_KEY, META_FILE, file_sha256
from contract.config import ConfigError, config_diff
from contract.resolve import ResolvedRun
from contract.targets import resolve_path


def target_sha256(run: ResolvedRun) -> str:
    """sha256 of the run's target weight file."""
    return file_sha256(resolve_path(run.cfg.target.weights))


def base_versions() -> dict[str, str]:
    """The library versions every checkpoint records; backends add their frameworks'."""
    return {"python": platform.python_version(), "numpy": np.__version__}


def build_meta(run: ResolvedRun, step: int, dtype_name: str, *, backend: str, fmt: str, versions: dict,
               extra: dict | None, **more) -> dict:
    """The metadata dict of a checkpoint of `run` at `step`. `more` (e.g. `param_order`,
    `prng_impl`) sits between `target_sha256` and `versions`."""
    return {
        "format": fmt,
        "backend": backend,
        META_DIGEST_KEY: DIGEST_FILE,
        "step": step,
        "config": run.cfg.to_dict(),
        "config_hash": run.cfg.hash(),
        "dtype": dtype_name,
        "target_sha256": target_sha256(run),
        **more,
        "versions": versions,
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "extra": extra or {},
    }


def meta_json(meta: dict) -> str:
    """The text of a plain `meta.json` file."""
    return json.dumps(meta, indent=1, sort_keys=True) + "\n"


def read_meta(path: str | Path) -> dict:
    """The plain `meta.json` of the checkpoint directory `path`."""
    path = Path(path)
    m = path / META_FILE
    if not m.is_file():
        raise FileNotFoundError(f"checkpoint {path}: {META_FILE} not found (not a checkpoint directory?)")
    return json.loads(m.read_text())


def check_format(meta: dict, fmt: str, path: str | Path) -> None:
    if meta.get("format") != fmt:
        raise ValueError(f"checkpoint {path}: unknown format {meta.get('format')!r} (expected {fmt!r})")


def computed(config: dict) -> dict:
    """A resolved config dict without `runtime.mesh`: where a run runs is not what it computes,
    so a checkpoint resumes on another mesh or number of ranks (S111)."""
    d = dict(config)
    if isinstance(d.get("runtime"), dict):
        d["runtime"] = {k: v for k, v in d["runtime"].items() if k != "mesh"}
    return d


def check_compatible(meta: dict, run: ResolvedRun, dtype_name: str, path: str | Path) -> None:
    """Refuse a resume under another config, dtype or target (ConfigError with a diff); the
    mesh may differ (S111)."""
    diff = config_diff(computed(meta["config"]), computed(run.cfg.to_dict()))
    if diff:
        raise ConfigError(f"cannot resume from {path}: it was written under a different config "
                          f"(checkpoint -> this run):\n" + "\n".join(diff) +
                          "\nuse the checkpoint's config, or start afresh (--no-resume / another --out)")
    if meta.get("dtype") != dtype_name:
        raise ConfigError(f"cannot resume from {path}: it holds a {meta.get('dtype')} state, this run is {dtype_name}")
    sha = target_sha256(run)
    if meta.get("target_sha256") not in (None, sha):
        raise ConfigError(f"cannot resume from {path}: the target weights {run.cfg.target.weights} changed since it was written "
                          f"(sha256 {meta['target_sha256'][:12]}… -> {sha[:12]}…)")
