"""Checks of a case bundle against the run it describes (parity/case_format.py holds the
checks that need no run): the run_config resolved with the bundle's target, batch shape and
precision, and the optional `init.*`, `draw.*` and `pin.*` tensors against that run's state,
draw plan, sites and forwards. Missing draws are sampled here (contract.draws.sample_numpy
from (seed, step)). Every refusal is a `CaseBundleError` naming the bad tensor or field."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np

from contract.config import ConfigError, parse_config
from contract.draws import draw_plan, sample_numpy
from contract.resolve import ResolvedRun, resolve_run
from contract.targets import EMBEDS_VS_EMBED_SITE
from parity.case_format import CaseBundle, CaseBundleError

EMBED_SITE = "model.embed_tokens"
_TAG = re.compile(r"t(\d+)\.e(\d+)\.d(\d+)")


def resolve_bundle_run(b: CaseBundle, weights: Path) -> ResolvedRun:
    """The bundle's run_config resolved with its target at `weights` (a file written by
    `write_target_dir`) and its precision; refuses a run_config that contradicts the metadata
    or the input's batch shape, and input.embeds with the embedding as a site."""
    where = b.path
    d = copy.deepcopy(b.run_config)
    tgt = d.get("target")
    tgt = tgt if isinstance(tgt, dict) else {}
    if tgt.get("kind", b.target_kind) != b.target_kind:
        raise CaseBundleError(f"{where}: run_config.target.kind is {tgt.get('kind')!r} but metadata target_kind is {b.target_kind!r}")
    d["target"] = {"kind": b.target_kind, "weights": str(weights)}
    rt = d.get("runtime")
    rt = rt if isinstance(rt, dict) else {}
    if rt.get("dtype", b.precision) != b.precision:
        raise CaseBundleError(f"{where}: run_config.runtime.dtype is {rt.get('dtype')!r} but metadata precision is {b.precision!r}")
    d["runtime"] = {**rt, "dtype": b.precision}
    try:
        run = resolve_run(parse_config(d, f"run_config of {where}"))
    except (ConfigError, FileNotFoundError, KeyError) as e:
        raise CaseBundleError(f"{where}: {e}") from None
    bs = b.batch_shape
    if run.cfg.batch_size != bs[0]:
        raise CaseBundleError(f"{where}: run_config.batch_size is {run.cfg.batch_size} but input.{b.input_name} has {bs[0]} rows")
    if b.target_kind == "llama" and run.cfg.data.seq_len != bs[1]:
        raise CaseBundleError(f"{where}: run_config.data.seq_len is {run.cfg.data.seq_len} but input.{b.input_name} has {bs[1]} positions")
    if b.input_name == "embeds" and EMBED_SITE in run.site_names:
        raise CaseBundleError(f"{where}: input.embeds with run_config.sites matching {EMBED_SITE}: {EMBEDS_VS_EMBED_SITE}")
    return run


def check_init(where: str, run: ResolvedRun, init: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    from contract.init import init_state

    want = init_state(run)
    if init is None:
        return want
    for n in want:
        if n not in init:
            raise CaseBundleError(f"{where}: tensor init.{n} is missing (give the whole state or no init.* at all)")
    for n, a in init.items():
        if n not in want:
            raise CaseBundleError(f"{where}: tensor init.{n} is not a leaf of this run's state")
        if tuple(a.shape) != want[n].shape:
            raise CaseBundleError(f"{where}: tensor init.{n} has shape {tuple(a.shape)}, expected {want[n].shape}")
        if not np.issubdtype(a.dtype, np.floating):
            raise CaseBundleError(f"{where}: tensor init.{n} has dtype {a.dtype}, expected a float dtype")
    return {n: init[n] for n in want}  # state order of contract.init


def check_draws(where: str, run: ResolvedRun, b: CaseBundle) -> tuple[dict, list[str]]:
    plan = {d.name: d for d in draw_plan(run, b.batch_shape)}
    for n, a in b.draws.items():
        if n not in plan:
            raise CaseBundleError(f"{where}: tensor draw.{n} is not in this run's draw plan "
                                  f"(plan: {', '.join(list(plan)[:6])}{', ...' if len(plan) > 6 else ''})")
        if tuple(a.shape) != plan[n].shape:
            raise CaseBundleError(f"{where}: tensor draw.{n} has shape {tuple(a.shape)}, expected {plan[n].shape}")
        if not np.issubdtype(a.dtype, np.floating):
            raise CaseBundleError(f"{where}: tensor draw.{n} has dtype {a.dtype}, expected a float dtype")
    missing = [plan[n] for n in plan if n not in b.draws]
    sampled = sample_numpy(missing, run.cfg.seed, b.step)
    draws = {n: (b.draws[n] if n in b.draws else sampled[n]) for n in plan}
    return draws, [d.name for d in missing]


def check_pins(where: str, run: ResolvedRun, b: CaseBundle) -> dict[str, np.ndarray]:
    bs = b.batch_shape
    terms = {t.index: t for t in run.recon_terms}
    sites = {s.name: s for s in run.sites}

    def _entry(name: str, tag: str):
        m = _TAG.fullmatch(tag)
        if not m:
            raise CaseBundleError(f"{where}: tensor pin.{name}: {tag!r} is not a forward tag t<term>.e<entry>.d<draw>")
        i, e, d = map(int, m.groups())
        if i not in terms:
            raise CaseBundleError(f"{where}: tensor pin.{name}: loss term {i} is not a recon term of run_config.loss_terms")
        t = terms[i]
        if e >= len(t.entries) or d >= t.entries[e].n_draws:
            raise CaseBundleError(f"{where}: tensor pin.{name}: term {i} ({t.type}) has no forward e{e}.d{d}")
        return t.entries[e]

    def _float(name, a, shape):
        if not np.issubdtype(a.dtype, np.floating):
            raise CaseBundleError(f"{where}: tensor pin.{name} has dtype {a.dtype}, expected a float dtype")
        if tuple(a.shape) != shape:
            raise CaseBundleError(f"{where}: tensor pin.{name} has shape {tuple(a.shape)}, expected {shape}")

    for name, a in b.pins.items():
        stage, _, rest = name.partition(".")
        if stage in ("ci_lower", "ci_upper"):
            if rest not in sites:
                raise CaseBundleError(f"{where}: tensor pin.{name}: {rest!r} is not a site of this run "
                                      f"(sites: {', '.join(sites)})")
            _float(name, a, bs + (sites[rest].C,))
        elif stage == "route":
            e = _entry(name, rest)
            if e.routing != "uniform_k":
                raise CaseBundleError(f"{where}: tensor pin.{name}: that forward is routed everywhere, a route pin would be ignored")
            if a.dtype != np.bool_ or tuple(a.shape) != bs + (len(e.live),):
                raise CaseBundleError(f"{where}: tensor pin.{name} is {a.dtype} {tuple(a.shape)}, expected bool "
                                      f"{bs + (len(e.live),)} (one column per live site: {', '.join(e.live)})")
        elif stage == "mask":
            m = re.match(r"(t\d+\.e\d+\.d\d+)\.(.+)", rest)
            if not m:
                raise CaseBundleError(f"{where}: tensor pin.{name}: expected pin.mask.t<term>.e<entry>.d<draw>.<site>")
            e = _entry(name, m.group(1))
            if m.group(2) not in e.live:
                raise CaseBundleError(f"{where}: tensor pin.{name}: {m.group(2)!r} is not live in that forward "
                                      f"(live: {', '.join(e.live)})")
            _float(name, a, bs + (sites[m.group(2)].C,))
        else:
            raise CaseBundleError(f"{where}: tensor pin.{name}: unknown pin; pins are pin.ci_lower.<site>, "
                                  "pin.ci_upper.<site>, pin.route.<tag>, pin.mask.<tag>.<site>")
    return dict(b.pins)

