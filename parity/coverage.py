"""Schema coverage of the parity cases (SPEC S152): every field of the run-config schema
(contract/config.py) that can change the numbers of a training step takes, in at least one
parity case, a value a port that ignored it would get wrong:

- a field with a default: a value other than its default;
- a required field: two distinct values over the cases, or for `coeff` a value other than 1;
- a Literal field: every allowed value (except `Schedule.kind`, see NON_DEFAULT_ONLY);
- a bool: both values;
- and the combinations: every sampling x delta channel with stochastic sources, every recon
  term type (= every source x plan of RECON_TERMS), every optimizer clip engaged (the
  group's gradient norm above its clip in the golden trajectory).

Fields that cannot change a training step of the parity gate are listed in EXEMPT with the
reason (and, where they matter elsewhere, the test that covers them)."""
from __future__ import annotations

import json
import types
import typing
from typing import Literal, get_args, get_origin

from pydantic import BaseModel

from contract.config import RECON_TERMS, RunConfig
from parity.cases import Case

EXEMPT: dict[str, str] = {
    "sigmoid": "a single allowed value (leaky_hard)",
    "data.source": "batches are made by contract/data.py and fed identically to both backends",
    "data.token_file": "batches are made by contract/data.py and fed identically to both backends",
    "data.feature_probability": "batches are made by contract/data.py (set by the TMS cases anyway)",
    "steps": "the case's length, set by the harness",
    "eval.every": "cadence of the loop, not a step's numbers",
    "eval.batch_size": "eval metrics: parity/test_eval_parity.py",
    "eval.n_batches": "eval metrics: parity/test_eval_parity.py",
    "eval.pgd_steps": "eval metrics: parity/test_eval_parity.py",
    "eval.pgd_step_size": "eval metrics: parity/test_eval_parity.py",
    "log_every": "cadence of the loop",
    "checkpoint.every": "cadence of the loop",
    "checkpoint.keep": "cadence of the loop",
    "runtime.dtype": "precision is the case's own axis (float64 and float32 cases; bf16 is refused by the oracle, "
                     "tests/test_jax_bf16.py; its reductions: parity/test_bf16_parity.py)",
    "runtime.mesh.data": "the same math on any mesh: tests/test_jax_mesh*.py, parity/test_parity_ranks.py",
    "runtime.mesh.components": "the same math on any mesh: tests/test_jax_mesh_invariance.py",
    "runtime.draws": "where the draws come from; the parity feed is runtime.draws contract by construction, "
                     "production: parity/test_production.py",
    "runtime.remat": "the same math recomputed (S144): tests/test_jax_mesh_invariance.py",
    "guard.nonfinite": "acts only on a non-finite step (tests/test_divergence.py)",
}
# Literal fields for which a non-default value suffices (the values are contract-side
# schedules, contract/schedules.py, fed to both backends as numbers)
NON_DEFAULT_ONLY = {"kind"}
NEUTRAL = {"coeff": 1.0}  # a required field whose one value must not be the neutral one


FAMILIES = {"pgd_recon": "fresh_pgd", "pgd_recon_layerwise": "fresh_pgd", "pgd_recon_subset": "fresh_pgd",
            "persistent_pgd_recon": "persistent_pgd", "persistent_pgd_recon_subset": "persistent_pgd"}


def _family(path: str) -> str:
    """A term's settings other than its coefficient are shared code across its plans (the
    fresh-PGD ascent, the persistent sources' optimizer): `loss_terms[pgd_recon_subset].init`
    is covered by any fresh-PGD term's `init`."""
    if not path.startswith("loss_terms[") or path.endswith("].coeff"):
        return path
    tag, rest = path[len("loss_terms["):].split("]", 1)
    return f"loss_terms[{FAMILIES.get(tag, tag)}]{rest}"


def _unwrap(ann) -> tuple[str, typing.Any]:
    """(origin kind, inner) of an annotation: 'model', 'list_model', 'union_models', 'literal', 'bool', 'leaf'."""
    origin = get_origin(ann)
    if origin is typing.Annotated:
        return _unwrap(get_args(ann)[0])
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "model", ann
    if origin is list:
        inner = _unwrap(get_args(ann)[0])
        if inner[0] == "model":
            return "list_model", inner[1]
        if inner[0] == "union_models":
            return "list_union", inner[1]
        return "leaf", ann
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        kinds = [_unwrap(a) for a in args]
        if kinds and all(k[0] == "model" for k in kinds):
            return "union_models", [k[1] for k in kinds]
        if len(args) == 1:
            return _unwrap(args[0])
        return "leaf", ann
    if origin is Literal:
        return "literal", get_args(ann)
    if ann is bool:
        return "bool", None
    return "leaf", ann


def schema_fields(model: type[BaseModel] = RunConfig, prefix: str = "") -> dict[str, tuple]:
    """{path: (field name, has_default, default, kind, literal values)} of every leaf field;
    loss terms are `loss_terms[<type>].<field>`, list items `<field>[]`."""
    out: dict[str, tuple] = {}
    for name, f in model.model_fields.items():
        ann = f.annotation
        if f.metadata:
            ann = typing.Annotated[ann, *f.metadata]
        kind, inner = _unwrap(ann)
        path = f"{prefix}{name}"
        if kind == "model":
            out |= schema_fields(inner, path + ".")
        elif kind == "list_model":
            out |= schema_fields(inner, path + "[].")
        elif kind == "list_union":
            for m in inner:
                tag = get_args(m.model_fields["type"].annotation)[0]
                sub = schema_fields(m, f"{path}[{tag}].")
                out |= {_family(k): v for k, v in sub.items() if not k.endswith(".type")}
        else:
            has_default = not f.is_required()
            default = f.get_default(call_default_factory=True) if has_default else None
            out[path] = (name, has_default, default, kind, inner if kind == "literal" else None)
    return out


def _values(d, prefix: str = "", out: dict | None = None) -> dict[str, list]:
    """{path: [values]} of a config dict (model_dump of a RunConfig) in schema_fields' paths."""
    out = {} if out is None else out
    for k, v in d.items():
        path = f"{prefix}{k}"
        if k == "loss_terms":
            for t in v:
                _values({kk: vv for kk, vv in t.items() if kk != "type"}, f"{path}[{t['type']}].", out)
        elif isinstance(v, dict):
            _values(v, path + ".", out)
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                _values(item, path + "[].", out)
        else:
            out.setdefault(_family(path), []).append(v)
    return out


def _norm(v):
    return json.dumps(v, sort_keys=True) if isinstance(v, (list, dict, tuple)) else v


def coverage_problems(cases: dict[str, Case], trajectories: dict[str, list[dict]]) -> list[str]:
    """What the case matrix leaves uncovered ([] if nothing). `trajectories`: each case's golden
    per-step records (for the clip check)."""
    fields = schema_fields()
    seen: dict[str, set] = {}
    cfgs = {n: c.cfg() for n, c in cases.items()}
    for cfg in cfgs.values():
        for p, vs in _values(cfg.model_dump(mode="json")).items():
            seen.setdefault(p, set()).update(_norm(v) for v in vs)
    out = []
    for path, (name, has_default, default, kind, lits) in sorted(fields.items()):
        if path in EXEMPT:
            continue
        vals = seen.get(path, set())
        if not vals and "[" in path:  # a loss-term type that no case uses: reported below
            continue
        if kind == "literal" and name not in NON_DEFAULT_ONLY:
            missing = [x for x in lits if _norm(x) not in vals]
            if missing:
                out.append(f"{path}: value(s) {missing} in no parity case")
        elif kind == "bool":
            if vals != {True, False}:
                out.append(f"{path}: only {sorted(vals)} in the parity cases (needs both)")
        elif has_default:
            if not (vals - {_norm(_dump(default))}):
                out.append(f"{path}: at its default {default!r} in every parity case")
        elif name in NEUTRAL:
            if not (vals - {NEUTRAL[name]}):
                out.append(f"{path}: {NEUTRAL[name]!r} in every parity case (a port ignoring it passes)")
        elif len(vals) < 2:
            out.append(f"{path}: a single value {sorted(vals, key=str)} in every parity case (needs two)")
    used = {t.type for cfg in cfgs.values() for t in cfg.loss_terms}
    out += [f"loss term {t} ({RECON_TERMS[t][1]} source x {RECON_TERMS[t][0]} plan) in no parity case"
            for t in RECON_TERMS if t not in used]
    stoch = {(c.sampling, c.use_delta_component) for c in cfgs.values()
             if any(RECON_TERMS.get(t.type, ("", ""))[1] == "stochastic" for t in c.loss_terms)}
    out += [f"sampling {s} with use_delta_component {dl} and a stochastic recon term in no parity case"
            for s in ("continuous", "binomial") for dl in (True, False) if (s, dl) not in stoch]
    for grp in ("components", "ci_fn"):
        engaged = [n for n, cfg in cfgs.items() if getattr(cfg.optim, grp).clip is not None and n in trajectories
                   and any(r.get(f"grad_norm/{grp}", 0.0) > getattr(cfg.optim, grp).clip for r in trajectories[n])]
        if not engaged:
            out.append(f"optim.{grp}.clip: engaged (gradient norm above the clip) in no parity case")
    return out


def _dump(v):
    return v.model_dump(mode="json") if isinstance(v, BaseModel) else (list(v) if isinstance(v, tuple) else v)
