"""Golden artifacts (made by the torch oracle only) and fail-closed comparison.

goldens/<case>/manifest.json   resolved config + hash, precision, steps, generator, oracle
                               lock hash, versions, platform, date, reason of last regeneration
goldens/<case>/terms.json      step-0 value of every metric (loss terms, grad norms, ...)
                               and the faithfulness-warmup losses
goldens/<case>/grads.safetensors  step-0 gradient of every leaf
goldens/<case>/trajectory.json every logged metric at every step
"""
from __future__ import annotations

import datetime
import json
import math
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from contract.targets import REPO_ROOT
from parity.cases import Case
from parity.lock import oracle_hash
from parity.tolerances import tol

GOLDENS = REPO_ROOT / "goldens"


def versions() -> dict:
    import importlib.metadata as md
    out: dict[str, str | None] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("numpy", "torch", "jax", "jaxlib", "optax", "transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def case_dir(name: str) -> Path:
    return GOLDENS / name


@dataclass
class Golden:
    manifest: dict
    terms: dict
    trajectory: list[dict]
    grads: dict[str, np.ndarray]


def write_golden(case: Case, records: list[dict], grads: dict, warmup: list[float], reason: str) -> Path:
    cfg = case.cfg()
    d = case_dir(case.name)
    d.mkdir(parents=True, exist_ok=True)
    manifest = {
        "case": case.name, "why": case.why, "config": cfg.to_dict(), "config_hash": cfg.hash(),
        "precision": case.precision, "steps": case.steps, "generator": "oracle_torch",
        "oracle_lock_hash": oracle_hash(), "versions": versions(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "reason": reason,
    }
    if case.init_edit:  # S154: the initial state is contract/init.py's with this exact edit
        manifest["init_edit"] = case.init_edit
    (d / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    terms = {"step0": records[0], "warmup": warmup}
    (d / "terms.json").write_text(json.dumps(terms, indent=1, sort_keys=True) + "\n")
    (d / "trajectory.json").write_text(json.dumps(records, indent=0, sort_keys=True) + "\n")
    save_file({k: np.ascontiguousarray(v) for k, v in grads.items()}, str(d / "grads.safetensors"))
    return d


def load_golden(name: str) -> Golden:
    d = case_dir(name)
    missing = [f for f in ("manifest.json", "terms.json", "trajectory.json", "grads.safetensors") if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(f"golden case {name!r}: {d} lacks {missing}; regenerate with "
                                f"`python -m parity.regen --reason '...' --cases {name}`")
    return Golden(json.loads((d / "manifest.json").read_text()), json.loads((d / "terms.json").read_text()),
                  json.loads((d / "trajectory.json").read_text()), load_file(str(d / "grads.safetensors")))


def provenance_note(g: Golden) -> str:
    now, then = versions(), g.manifest.get("versions", {})
    diffs = [f"{k}: golden {then.get(k)} vs now {now.get(k)}" for k in sorted(set(now) | set(then)) if now.get(k) != then.get(k)]
    head = f"golden made {g.manifest.get('date')} by {g.manifest.get('generator')} (reason: {g.manifest.get('reason')})"
    return head + ("; versions differ: " + "; ".join(diffs) if diffs else "; same library versions")


# ------------------------------------------------------------------ comparison
@dataclass
class Report:
    """Outcome of one comparison: failures (first divergence first) and the worst error
    observed per quantity next to its tolerance, so margins are visible."""
    label: str
    failures: list[str] = field(default_factory=list)
    worst: dict[str, tuple[float, float, str]] = field(default_factory=dict)  # what -> (err, allowed, where)

    def note(self, what: str, err: float, allowed: float, where: str):
        if what not in self.worst or err / allowed > self.worst[what][0] / self.worst[what][1]:
            self.worst[what] = (err, allowed, where)

    @property
    def ok(self) -> bool:
        return not self.failures

    def message(self, extra: str = "") -> str:
        lines = [f"{self.label}: {len(self.failures)} problem(s); first: {self.failures[0]}" if self.failures else f"{self.label}: ok"]
        lines += [f"  {f}" for f in self.failures[1:8]]
        if len(self.failures) > 8:
            lines.append(f"  ... and {len(self.failures) - 8} more")
        lines += [f"  worst {w}: {e:.2e} (allowed {a:.1e}) at {where}" for w, (e, a, where) in self.worst.items()]
        if extra:
            lines.append("  " + extra)
        return "\n".join(lines)


def rel_err(a: float, b: float, floor: float) -> float:
    if a == b:
        return 0.0
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    return abs(a - b) / max(abs(a), abs(b), floor)


def compare_records(rep: Report, got: list[dict], want: list[dict], precision: str):
    """Fail closed on keys; per step the first diverging metric is reported in step order."""
    if len(got) != len(want):
        rep.failures.append(f"{len(got)} steps produced, golden has {len(want)}")
    for k, (g, w) in enumerate(zip(got, want, strict=False)):  # a length mismatch is reported above; compare the common steps
        extra, absent = sorted(set(g) - set(w)), sorted(set(w) - set(g))
        if extra:
            rep.failures.append(f"step {k}: produced keys with no golden: {extra[:6]}")
        if absent:
            rep.failures.append(f"step {k}: golden keys not produced: {absent[:6]}")
        t = tol(precision, "term" if k == 0 else "trajectory")
        allowed = t.rel * (1 + t.growth * k)
        for key in sorted(set(g) & set(w), key=_metric_order):
            e = rel_err(float(g[key]), float(w[key]), t.floor)
            rep.note("step0 terms" if k == 0 else "trajectory", e, allowed, f"step {k} {key}")
            if e > allowed:
                rep.failures.append(f"step {k} {key}: {g[key]!r} vs {w[key]!r} (rel err {e:.2e} > {allowed:.1e})")


def _metric_order(key: str):
    # losses first (the term usually names the cause), then per-leaf gradient norms (they
    # name the tensor), then group norms, then the rest
    order = ("loss/", "grad_norm/", "grad_norm_group/", "param_norm/", "l0/", "sched/")
    if key in ("grad_norm/components", "grad_norm/ci_fn"):
        key = "grad_norm_group/" + key
    return (next((i for i, p in enumerate(order) if key.startswith(p)), len(order)), key)


def compare_grads(rep: Report, got: dict, want: dict, precision: str):
    extra, absent = sorted(set(got) - set(want)), sorted(set(want) - set(got))
    if extra:
        rep.failures.append(f"step-0 gradients produced with no golden: {extra}")
    if absent:
        rep.failures.append(f"golden step-0 gradients not produced: {absent}")
    t = tol(precision, "grad")
    for n in sorted(set(got) & set(want)):
        g, w = np.asarray(got[n], np.float64), np.asarray(want[n], np.float64)
        if g.shape != w.shape:
            rep.failures.append(f"step-0 grad {n}: shape {g.shape} vs golden {w.shape}")
            continue
        scale = max(np.linalg.norm(w), np.linalg.norm(g))
        e = 0.0 if scale == 0 else float(np.abs(g - w).max() / scale)
        rep.note("step0 grads", e, t.rel, f"leaf {n}")
        if e > t.rel:
            i = np.unravel_index(np.abs(g - w).argmax(), g.shape)
            rep.failures.append(f"step-0 grad {n}: max |diff| / ||grad|| = {e:.2e} > {t.rel:.1e} at index {tuple(int(x) for x in i)}")


def compare_warmup(rep: Report, got: list[float], want: list[float], precision: str):
    if len(got) != len(want):
        rep.failures.append(f"faithfulness warmup: {len(got)} losses vs golden {len(want)}")
    t = tol(precision, "trajectory")
    for k, (g, w) in enumerate(zip(got, want, strict=False)):  # a length mismatch is reported above; compare the common steps
        e = rel_err(g, w, t.floor)
        rep.note("warmup", e, t.rel, f"warmup step {k}")
        if e > t.rel:
            rep.failures.append(f"faithfulness warmup step {k}: {g!r} vs {w!r} (rel err {e:.2e})")


def compare_result(label: str, precision: str, got: tuple, want: tuple) -> Report:
    """got/want = (records, step-0 grads, warmup losses)."""
    rep = Report(label)
    compare_warmup(rep, got[2], want[2], precision)
    # step-0 gradient tensors before the records: at step 0 they name the leaf and index
    compare_grads(rep, got[1], want[1], precision)
    compare_records(rep, got[0], want[0], precision)
    return rep
