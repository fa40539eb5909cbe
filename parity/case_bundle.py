"""Case bundles: ONE safetensors file that describes one VPD training step from scratch, for
any target (any Hugging Face Llama, or a TMS / ResidMLP toy), so a user can hand a failing
step to either backend without the repository's shipped weights, configs or data.

  python -m parity.case_bundle terms --case FILE --backend torch|jax
  python -m parity.case_bundle make --config configs/X.yaml --out FILE [--batch-step K] [--embeds]
        [--precision float32|float64] [--with-draws]

The format (tensors `target.*`, `input.*`, optional `init.*`, `pin.*`, `draw.*`, and the
metadata) is parity/case_format.py, which reads, writes and structurally checks a bundle;
parity/case_checks.py checks it against its resolved run. This module makes a bundle
runnable (`materialise`), runs its step (`terms`), writes one from a shipped config
(`make_from_config`) and is the CLI.

`terms` runs the step's forward and backward on exactly the bundle's state (no faithfulness
warmup, no persistent-PGD warmup ascents, no optimizer update) through the backend interface
(`Backend.forward_terms`) and returns every term (`loss/<i>.<type>`), `loss/total`,
`grad_norm/<leaf>`, for persistent-PGD terms `grad_norm/sources.<bundle>.<site>` (the norm of
the term's gradient with respect to its sources, `init.sources.*`) and the pre-clip group
norms `grad_norm/components`, `grad_norm/ci_fn`.
Both backends read the target through their usual loaders: `materialise` writes it to a
temporary directory in the contract's format (safetensors + `<stem>.json`).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from contract.config import ConfigError
from contract.draws import draw_plan, sample_numpy
from contract.resolve import ResolvedRun, resolve_run
from contract.targets import EMBEDS_VS_EMBED_SITE
from parity import case_format
from parity.case_checks import EMBED_SITE, check_draws, check_init, check_pins, resolve_bundle_run
from parity.case_format import (
    FORMAT,
    INPUTS,
    KINDS,
    PRECISIONS,
    PREFIXES,
    REQUIRED_CONFIG,
    CaseBundle,
    CaseBundleError,
    bundle_from_parts,
    normalise_llama_config,
    read_case_bundle,
    sync_run_config,
    tied_lm_head,
    write_case_bundle,
)

__all__ = [  # the case-bundle API, importable from here whichever module defines it
    "EMBED_SITE", "FORMAT", "INPUTS", "KINDS", "PRECISIONS", "PREFIXES", "REQUIRED_CONFIG",
    "CaseBundle", "CaseBundleError", "Materialised", "bundle_from_parts", "main", "make_from_config",
    "materialise", "normalise_llama_config", "read_case_bundle", "sync_run_config", "terms",
    "write_case_bundle", "write_target_dir",
]


@dataclass
class Materialised:
    """A bundle made runnable: the resolved run (target.weights points into a temp dir that
    lives as long as the `materialise` context) and every numpy input of the step."""
    bundle: CaseBundle
    run: ResolvedRun
    init: dict[str, np.ndarray]
    batch: np.ndarray
    draws: dict[str, np.ndarray]
    pins: dict[str, np.ndarray]
    sampled_draws: list[str]


# ---------------------------------------------------------------- materialisation
def write_target_dir(b: CaseBundle, out_dir: Path) -> Path:
    """The bundle's target in the contract's format: `<dir>/target.safetensors` + `target.json`."""
    tensors = dict(b.target)
    if tied_lm_head(b.target_kind, b.target_config) and "lm_head.weight" not in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # the torch loader wants both keys
    w = out_dir / "target.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(w))
    w.with_suffix(".json").write_text(json.dumps(
        {"kind": b.target_kind, "config": b.target_config, "training": {"source": f"case bundle {b.path}"}}, indent=1))
    return w



@contextmanager
def materialise(bundle: CaseBundle | str | Path):
    """Yield a `Materialised` step; the target lives in a temp dir until the context ends."""
    b = bundle if isinstance(bundle, CaseBundle) else read_case_bundle(bundle)
    where = b.path
    with tempfile.TemporaryDirectory(prefix="vpd_case_") as tmp:
        w = write_target_dir(b, Path(tmp))
        run = resolve_bundle_run(b, w)
        init = check_init(where, run, b.init)
        draws, sampled = check_draws(where, run, b)
        pins = check_pins(where, run, b)
        yield Materialised(b, run, init, b.input, draws, pins, sampled)


# ---------------------------------------------------------------- one step, no update
def _terms(m: Materialised, backend_name: str, fast_compile: bool = False) -> dict[str, float]:
    """The bundle's step through the backend interface: `forward_terms` on the state built from
    the bundle's init arrays (persistent-PGD sources included), with the bundle's draws and
    pins; the probe's `grad.*` give the gradient norms (in float64 on the host)."""
    from contract.backend import Probe
    from loop.backends import make_backend

    run = m.run
    ftype = np.float64 if run.cfg.runtime.dtype == "float64" else np.float32
    pins = {n: a if a.dtype == np.bool_ else a.astype(ftype) for n, a in m.pins.items()}
    backend = make_backend(backend_name, run)
    try:
        state = backend.new_state(m.init)
        record: dict = {}
        with _fast_compile(backend_name == "jax" and fast_compile):
            vals = backend.forward_terms(state, m.bundle.step, m.batch, m.draws, Probe(record, pins))
    finally:
        backend.close()
    out = {f"loss/{k}": v for k, v in vals.items() if k != "total"}
    out["loss/total"] = vals["total"]
    norms = {n[len("grad."):]: float(np.linalg.norm(np.asarray(g, np.float64).ravel()))
             for n, g in record.items() if n.startswith("grad.")}
    out |= {f"grad_norm/{n}": v for n, v in norms.items()}
    for grp in ("components", "ci_fn"):  # pre-clip group norm as in clip_grad_norm (S43)
        out[f"grad_norm/{grp}"] = float(np.linalg.norm([v for n, v in norms.items() if n.startswith(grp + ".")]))
    return out


@contextmanager
def _fast_compile(on: bool):
    """XLA's backend (LLVM) optimisation level 0 while JAX compiles the step
    (`jax_disable_most_optimizations`): about half the compile time, the same HLO (results
    move by last-bit rounding only, ~2e-15 in float64); off = production."""
    if not on:
        yield
        return
    import jax

    before = bool(jax.config.values.get("jax_disable_most_optimizations", False))
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


def terms(path: str | Path | CaseBundle, backend: str, fast_compile: bool = False) -> dict[str, float]:
    """One step of the bundle on `backend` ("torch" | "jax"), no optimizer update: every
    term, the total, per-leaf gradient norms (persistent-PGD sources: the norm of their term's
    gradient, `grad_norm/sources.<bundle>.<site>`) and the pre-clip group norms. JAX runs the
    step jitted (`fast_compile`: XLA backend optimisation level 0, for large targets).
    JAX float64 needs jax_enable_x64 on before JAX starts (the CLI sets it)."""
    if backend not in ("torch", "jax"):
        raise ValueError(f"backend: expected 'torch' or 'jax', got {backend!r}")
    with materialise(path) as m:
        out = _terms(m, backend, fast_compile)
    return dict(sorted(out.items()))


# ---------------------------------------------------------------- make from a shipped config
def make_from_config(config: str | Path, out: str | Path, batch_step: int = 0, embeds: bool = False,
                     precision: str | None = None, with_draws: bool = False) -> Path:
    """A bundle of a shipped config: weights from its target file, the batch of step
    `batch_step` (contract.data), the initial state from contract.init (no faithfulness
    warmup), draws of step 0 only if `with_draws` (else sampled when the bundle is read)."""
    from safetensors.numpy import load_file

    from contract.config_file import load_config
    from contract.data import batch_for_step
    from contract.init import init_state
    from contract.targets import load_target_meta, resolve_path

    cfg = load_config(config)
    run = resolve_run(cfg)
    prec = precision or cfg.runtime.dtype
    if prec not in PRECISIONS:
        raise CaseBundleError(f"--precision: {prec!r}, expected one of {list(PRECISIONS)}")
    meta = load_target_meta(cfg.target.weights)
    target = load_file(str(resolve_path(cfg.target.weights)))
    x = batch_for_step(run, cfg.seed, batch_step)
    inputs: dict = {}
    if run.cfg.target.kind == "llama":
        if embeds:
            if EMBED_SITE in run.site_names:
                raise CaseBundleError(f"--embeds with {config}: its sites include {EMBED_SITE}; {EMBEDS_VS_EMBED_SITE}")
            inputs["input_embeds"] = target["model.embed_tokens.weight"][x]
        else:
            inputs["input_ids"] = x.astype(np.int64)
    else:
        if embeds:
            raise CaseBundleError(f"--embeds: the {run.cfg.target.kind!r} target takes features, not embeddings")
        inputs["input_x"] = x
    draws = sample_numpy(draw_plan(run, x.shape[:2] if run.cfg.target.kind == "llama" else x.shape[:1]),
                         cfg.seed, 0) if with_draws else None
    return write_case_bundle(out, target_kind=meta["kind"], target_config=meta["config"], target=target,
                             run_config=cfg.to_dict(), precision=prec, init=init_state(run), draws=draws, **inputs)


def main(argv=None) -> int:
    fmt = (case_format.__doc__ or "").partition("\n\n")[2]  # the format's tensors and metadata
    doc = f"{__doc__ or ''}\n{fmt}"
    ap = argparse.ArgumentParser(prog="python -m parity.case_bundle", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("terms", help="print one step's terms and gradient norms (JSON)")
    t.add_argument("--case", required=True, help="case bundle (.safetensors)")
    t.add_argument("--backend", required=True, choices=["torch", "jax"])
    t.add_argument("--fast-compile", action="store_true", help="jax: XLA backend optimisation level 0 (faster compile)")
    k = sub.add_parser("make", help="write a bundle from a shipped config")
    k.add_argument("--config", required=True)
    k.add_argument("--out", required=True)
    k.add_argument("--batch-step", type=int, default=0, help="take the data batch of this step (default 0)")
    k.add_argument("--embeds", action="store_true", help="store input.embeds (embedding rows of the ids)")
    k.add_argument("--precision", choices=list(PRECISIONS), help="default: the config's runtime.dtype")
    k.add_argument("--with-draws", action="store_true", help="store the step's draws (else sampled on read)")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "make":
            p = make_from_config(a.config, a.out, a.batch_step, a.embeds, a.precision, a.with_draws)
            print(f"wrote {p}")
            return 0
        if a.backend == "jax":
            b = read_case_bundle(a.case)
            if b.precision == "float64":
                import jax
                jax.config.update("jax_enable_x64", True)
        print(json.dumps(terms(a.case, a.backend, a.fast_compile), indent=1))
        return 0
    except (CaseBundleError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
