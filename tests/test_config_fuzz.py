"""Fuzzing the config schema through both command lines (SPEC S1, S93, S96).

A seeded generator mutates the shipped configs (`configs/*.yaml`) and a tiny TMS config
into malformed ones, each invalid by construction: the mutation is read off the schema
itself (`contract.config.RunConfig`'s fields, their types and bounds), so a field added to
the schema is fuzzed without touching this file. Categories: wrong types, bools for ints
and floats, floats for ints, strings for numbers and bools, non-finite floats, values out
of a field's bounds, nulls for required fields, unknown keys, missing required keys,
wrong enum values, bad nesting (a mapping where a scalar or list belongs and vice versa),
bad AdamW betas, duplicate keys in the YAML text, and cross-field mistakes refused at
resolve time (a missing weight file, a pattern matching nothing, a term given twice).

Each config runs through BOTH CLIs in-process (`vpd-oracle` and `vpd-train`); each must
exit with code 2 and print exactly one stderr line `PROG: error: MESSAGE`, no traceback,
MESSAGE naming the field path (or, for a duplicate key, the key and both lines), and the
same MESSAGE from both backends. A config the CLI accepts would fail at once (the
backend factory is replaced by a tripwire), never train.

Every kind of mutation (category x schema field x bad value, `kind_of`) is run once per
run, on a base drawn by the seed (~1000 configs, a few seconds): a field that stops refusing
one bad value fails every run, whichever seed. Counts (configs generated and refused, per
category) are printed at the end: `pytest tests/test_config_fuzz.py -rP`.
`CONFIG_FUZZ_SEED=N` draws other bases; `CONFIG_FUZZ_N=K` runs a stratified sample of K.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import types
import typing
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import pytest
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from contract.config import RunConfig, parse_config
from contract.config_file import ConfigLoader
from contract.resolve import resolve_run
from contract.targets import REPO_ROOT
from tests.helpers import tms_config, write_tiny_tms

# one worker: the configs and the tiny target live in one module-scoped directory
pytestmark = pytest.mark.xdist_group("config_fuzz")

SEED = int(os.environ.get("CONFIG_FUZZ_SEED", "0"))
N_CONFIGS = int(os.environ["CONFIG_FUZZ_N"]) if os.environ.get("CONFIG_FUZZ_N") else None
MIN_CONFIGS = 200
PROGS = ("vpd-oracle", "vpd-train")


# ------------------------------------------------------------------ the schema, read off pydantic
@dataclass
class Spec:
    kind: str  # int float bool str literal model list tuple union
    optional: bool = False
    gt: Any = None
    ge: Any = None
    lt: Any = None
    le: Any = None
    min_length: int | None = None
    choices: tuple = ()
    cls: Any = None  # model class
    item: Spec | None = None  # list item
    items: list[Spec] = field(default_factory=list)  # tuple items
    members: tuple = ()  # union member classes (discriminated on `type`)


def _bounds(spec: Spec, meta) -> Spec:
    for m in meta:
        if isinstance(m, FieldInfo):
            _bounds(spec, m.metadata)
            continue
        for k in ("gt", "ge", "lt", "le", "min_length"):
            if getattr(m, k, None) is not None:
                setattr(spec, k, getattr(m, k))
    return spec


def classify(ann, meta=()) -> Spec:
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Annotated:
        return classify(args[0], (*meta, *args[1:]))
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            s = classify(rest[0], meta)
            s.optional = True
            return s
        return Spec("union", members=tuple(rest))
    if origin is Literal:
        return Spec("literal", choices=args)
    if origin is list:
        return _bounds(Spec("list", item=classify(args[0])), meta)
    if origin is tuple:
        return Spec("tuple", items=[classify(a) for a in args])
    if ann in (bool, int, float, str):
        return _bounds(Spec(ann.__name__), meta)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return Spec("model", cls=ann)
    raise AssertionError(f"the fuzzer does not know the annotation {ann!r}; teach classify() about it")


def field_specs(cls) -> dict[str, tuple[Spec, bool]]:
    return {n: (classify(fi.annotation, tuple(fi.metadata)), fi.is_required()) for n, fi in cls.model_fields.items()}


def member_of(spec: Spec, d: dict):
    for c in spec.members:
        if d.get("type") in typing.get_args(c.model_fields["type"].annotation):
            return c
    raise AssertionError(f"no member of the union has type {d.get('type')!r}")


# ------------------------------------------------------------------ mutations
DELETE = object()


@dataclass
class Mutation:
    category: str
    path: tuple  # where the value is set / deleted
    value: Any = None
    expect: str = ""  # the field path the message must name
    text: Any = None  # a text-level mutation: (yaml text, key, first line, second line)


def bad_values(spec: Spec) -> list[tuple[str, Any]]:
    """(category, value) pairs that `spec` refuses by construction."""
    out: list[tuple[str, Any]] = []
    if not spec.optional and spec.kind not in ("model",):
        out.append(("null_for_required", None))
    k = spec.kind
    if k in ("int", "float"):
        one = 1 if k == "int" else 0.5
        out += [("bool_for_number", True), ("bool_for_number", False), ("string_for_number", str(one)),
                ("wrong_type", "ten"), ("wrong_type", [one]), ("bad_nesting", {"value": one})]
        if k == "int":
            out += [("float_for_int", 2.5), ("float_for_int", 3.0)]
        else:
            out += [("non_finite", math.inf), ("non_finite", -math.inf), ("non_finite", math.nan)]
        step = 1 if k == "int" else 0.5
        if spec.gt is not None:
            out += [("out_of_range", spec.gt), ("out_of_range", spec.gt - step)]
        if spec.ge is not None:
            out.append(("out_of_range", spec.ge - step))
        if spec.lt is not None:
            out += [("out_of_range", spec.lt), ("out_of_range", spec.lt + step)]
        if spec.le is not None:
            out.append(("out_of_range", spec.le + step))
    elif k == "bool":
        out += [("int_for_bool", 1), ("int_for_bool", 0), ("string_for_bool", "true"), ("string_for_bool", "yes"),
                ("wrong_type", 1.0), ("bad_nesting", [True])]
    elif k == "str":
        out += [("wrong_type", 3), ("wrong_type", 1.5), ("wrong_type", True), ("bad_nesting", ["x"]),
                ("bad_nesting", {"name": "x"})]
        if spec.min_length:
            out.append(("out_of_range", ""))
    elif k == "literal":
        c = str(spec.choices[0])
        out += [("wrong_enum", c + "_x"), ("wrong_enum", ""), ("wrong_type", 1), ("wrong_type", True),
                ("bad_nesting", [c])]
        if c.upper() not in spec.choices:
            out.append(("wrong_enum", c.upper()))
    elif k == "model":
        out += [("bad_nesting", 3), ("bad_nesting", "x"), ("bad_nesting", [{}]), ("bad_nesting", True)]
        if not spec.optional:
            out.append(("null_for_required", None))
    elif k == "list":
        out += [("bad_nesting", {"0": 1}), ("wrong_type", "x"), ("wrong_type", 3)]
        if spec.min_length:
            out.append(("out_of_range", []))
        assert spec.item is not None
        if spec.item.kind in ("int", "float"):
            out += [("bool_for_number", [True]), ("bad_nesting", [[8]])]
            out += [(cat, [v]) for cat, v in bad_values(spec.item) if cat == "out_of_range"]
            if spec.item.kind == "int":
                out.append(("float_for_int", [2.5]))
        else:
            out += [("bad_nesting", [3]), ("bad_nesting", [[{}]])]
    elif k == "tuple":  # the AdamW betas, the schema's only tuple
        assert len(spec.items) == 2 and all(i.kind == "float" and i.ge == 0 and i.lt == 1 for i in spec.items), \
            "a tuple field other than the betas: teach bad_values() about it"
        out += [("bad_betas", [1.0, 0.999]), ("bad_betas", [0.9, 1.0]), ("bad_betas", [-0.1, 0.999]),
                ("bad_betas", [1.5, 0.5]), ("bad_betas", [0.9, math.nan]), ("bad_betas", [math.inf, 0.999]),
                ("bad_betas", [True, 0.999]), ("bad_betas", ["0.9", 0.999]), ("bad_betas", [0.9]),
                ("bad_betas", [0.9, 0.99, 0.999]), ("bad_betas", []), ("bad_betas", 0.9),
                ("bad_betas", {"beta1": 0.9})]
    return out


def model_mutations(cls, data: dict, path: tuple, in_union: bool = False) -> list[Mutation]:
    """Every mutation of the model `cls` whose config mapping is `data` at `path`."""
    out: list[Mutation] = []
    dotted = ".".join(map(str, path))
    here = (lambda n: f"{dotted}.{n}") if path else (lambda n: n)
    specs = field_specs(cls)
    for name, (spec, required) in specs.items():
        p = (*path, name)
        # the tag of a discriminated union is reported at the term (`loss_terms.1: ...`)
        expect = dotted if (in_union and name == "type") else here(name)
        if name in data and required:
            out.append(Mutation("missing_required", p, DELETE, expect))
        for cat, v in bad_values(spec):
            out.append(Mutation(cat, p, v, expect))
        sub = data.get(name)
        if spec.kind == "model":
            if isinstance(sub, dict):
                out += model_mutations(spec.cls, sub, p)
            elif name not in data and not any(r for _, r in field_specs(spec.cls).values()):
                out += model_mutations(spec.cls, {}, p)  # an absent section, every field defaulted
        elif spec.kind == "list" and isinstance(sub, list) and spec.item is not None:
            for i, item in enumerate(sub):
                if spec.item.kind == "model" and isinstance(item, dict):
                    out += model_mutations(spec.item.cls, item, (*p, i))
                elif spec.item.kind == "union" and isinstance(item, dict):
                    out += model_mutations(member_of(spec.item, item), item, (*p, i), in_union=True)
    for bogus in ("zz_unknown", "extra_" + (next(iter(specs)) if specs else "x")):
        if bogus not in specs:
            out.append(Mutation("unknown_key", (*path, bogus), 1, here(bogus)))
    for name in specs:  # a typo of a real key, given beside it
        typo = name + name[-1]
        if typo not in specs:
            out.append(Mutation("unknown_key", (*path, typo), data.get(name, 1), here(typo)))
            break
    return out


def cross_field_mutations(base: dict) -> list[Mutation]:
    """Mistakes the schema accepts and resolve_run refuses (S2, S20, the weight file)."""
    out = [Mutation("resolve", ("target", "weights"), "contract/weights/no_such_target.safetensors", "target.weights"),
           Mutation("resolve", ("sites", 0, "pattern"), "no_module_is_called_this*", "sites.0.pattern")]
    n = len(base["sites"])
    out.append(Mutation("resolve", ("sites", n), copy.deepcopy(base["sites"][0]), f"sites.{n}.pattern"))
    faith = [t for t in base["loss_terms"] if t["type"] == "faithfulness"]
    if faith:
        out.append(Mutation("resolve", ("loss_terms", len(base["loss_terms"])), copy.deepcopy(faith[0]), "loss_terms"))
    return out


def apply(base: dict, m: Mutation) -> dict:
    d = copy.deepcopy(base)
    cur: Any = d
    for k in m.path[:-1]:
        if isinstance(cur, dict) and k not in cur:
            cur[k] = {}
        cur = cur[k]
    last = m.path[-1]
    if m.value is DELETE:
        del cur[last]
    elif isinstance(cur, list) and last == len(cur):
        cur.append(m.value)
    else:
        cur[last] = m.value
    return d


KEY_LINE = re.compile(r"^(\s*)([A-Za-z_]\w*):(\s.*)?$")
FLOW_PAIR = re.compile(r"\{(\w+): ([^,{}\[\]]+?)([,}])")


def duplicate_key_mutations(text: str) -> list[Mutation]:
    """A key given twice in one mapping, in YAML text: a block-mapping line repeated (with
    another value when it is an int, so the last would silently win), or the first pair of
    a flow mapping `{k: v, ...}` repeated."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        m = KEY_LINE.match(line)
        if m:
            rest = (m.group(3) or "").strip()
            dup = line if not rest.isdigit() else f"{m.group(1)}{m.group(2)}: {int(rest) + 1}"
            new = lines[:i + 1] + [dup] + lines[i + 1:]
            out.append(Mutation("duplicate_key", (), text=("\n".join(new) + "\n", m.group(2), i + 1, i + 2)))
        f = FLOW_PAIR.search(line)
        if f:
            key, val = f.group(1), f.group(2)
            new_line = line[:f.start()] + f"{{{key}: {val}, {key}: {val}{f.group(3)}" + line[f.end():]
            new = lines[:i] + [new_line] + lines[i + 1:]
            out.append(Mutation("duplicate_key", (), text=("\n".join(new) + "\n", key, i + 1, i + 1)))
    return out


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


# ------------------------------------------------------------------ the bases
def bases(tiny_weights: str) -> dict[str, tuple[dict, str | None]]:
    """name -> (config dict, raw YAML text or None). Every base parses and resolves."""
    out: dict[str, tuple[dict, str | None]] = {}
    for p in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        text = p.read_text()
        out[p.stem] = (yaml.load(text, Loader=ConfigLoader), text)
    tiny = tms_config(tiny_weights)
    out["tiny_tms"] = (tiny, None)
    # a persistent-PGD term and every optional section spelled out: the source optimizer
    # (its betas) and eval / checkpoint / runtime fields are fuzzed inside a present mapping
    out["tiny_tms_ppgd"] = (dict(copy.deepcopy(tiny),
                                 loss_terms=tiny["loss_terms"] + [{"type": "persistent_pgd_recon", "coeff": 0.5,
                                                                   "optimizer": {"type": "adam", "lr": {"start": 0.01},
                                                                                 "betas": [0.5, 0.99]}}],
                                 eval={"every": 2, "batch_size": 6, "pgd_steps": 1},
                                 checkpoint={"every": 2, "keep": 1},
                                 runtime={"dtype": "float32", "mesh": {"data": 1, "components": 1}},
                                 data={"feature_probability": 0.1}), None)
    return out


def kind_of(m: Mutation) -> tuple:
    """What a mutation exercises, whatever the base: (category, schema field with list
    indices as `*`, value) or, for a duplicate key, (category, key, one line or two)."""
    if m.text is not None:
        return (m.category, m.text[1], m.text[2] == m.text[3])
    return (m.category, ".".join("*" if isinstance(x, int) else str(x) for x in m.path), repr(m.value))


def generate(tiny_weights: str, seed: int, n: int | None = None) -> list[tuple[str, Mutation, str]]:
    """One mutated config (base name, mutation, YAML text) per kind of mutation (`kind_of`),
    the base (and, for duplicate keys, the line) drawn by the seed; with `n`, a seeded
    sample of n of them, stratified over the categories."""
    rng = random.Random(seed)
    by_kind: dict[tuple, list[tuple[str, dict, Mutation]]] = {}
    for name, (base, raw) in bases(tiny_weights).items():
        resolve_run(parse_config(copy.deepcopy(base)))  # the base is valid: the mutation alone is at fault
        muts = model_mutations(RunConfig, base, ()) + cross_field_mutations(base)
        muts += duplicate_key_mutations(yaml.safe_dump(base, sort_keys=False))
        muts += duplicate_key_mutations(raw) if raw else []
        for m in muts:
            by_kind.setdefault(kind_of(m), []).append((name, base, m))
    by_cat: dict[str, list[tuple[str, Mutation, str]]] = {}
    for kind in sorted(by_kind, key=repr):
        cands = by_kind[kind]
        rng.shuffle(cands)
        for name, base, m in cands:
            if m.text is not None:
                text = m.text[0]
            else:
                d = apply(base, m)
                text = yaml.safe_dump(d, sort_keys=False)
                if not _same(yaml.load(text, Loader=ConfigLoader), d):
                    continue  # the YAML text would not say what the mutation says; another base
            by_cat.setdefault(m.category, []).append((name, m, text))
            break
    picked: list[tuple[str, Mutation, str]] = []
    if n is None:
        return [c for cat in sorted(by_cat) for c in by_cat[cat]]
    for v in by_cat.values():
        rng.shuffle(v)
    while len(picked) < n and any(by_cat.values()):
        for cat in sorted(by_cat):
            if by_cat[cat] and len(picked) < n:
                picked.append(by_cat[cat].pop())
    return picked


# ------------------------------------------------------------------ the test
class _Accepted(BaseException):
    """Raised when a CLI gets past the config checks (BaseException: no handler swallows it)."""


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("config_fuzz")


def test_malformed_configs_are_refused_alike_by_both_clis(fuzz_dir, capsys, monkeypatch):
    # guards S1/S93/S96: every malformed config is refused by both CLIs with exit code 2 and
    # one identical line naming the field (the duplicate key and its lines), never a traceback
    import jax_impl.cli
    import loop.backends
    import loop.cli
    import oracle_torch.cli

    def tripwire(*a, **k):
        raise _Accepted("the CLI accepted the config and went on to build a backend")

    monkeypatch.setattr(loop.backends, "make_backend", tripwire)
    monkeypatch.setattr(loop.cli, "make_backend", tripwire, raising=False)
    mains = {"vpd-oracle": oracle_torch.cli.main, "vpd-train": jax_impl.cli.main}

    configs = generate(write_tiny_tms(fuzz_dir), SEED, N_CONFIGS)
    assert len(configs) >= min(N_CONFIGS or MIN_CONFIGS, MIN_CONFIGS), f"only {len(configs)} malformed configs generated"
    refused: Counter = Counter()
    failures = []
    for n, (base, m, text) in enumerate(configs):
        cfg = fuzz_dir / f"c{n:04d}.yaml"
        cfg.write_text(text)
        what = f"[{n}] {m.category} on {base} at {'.'.join(map(str, m.path)) or '(text)'} = {m.value!r}"
        msgs, problems = {}, []
        for prog, main in mains.items():
            try:
                rc = main(["train", str(cfg), "--out", str(fuzz_dir / "out"), "--quiet"])
            except _Accepted:
                rc = "accepted"
            err = capsys.readouterr().err
            lines = err.splitlines()
            prefix = f"{prog}: error: "
            if rc != 2:
                problems.append(f"{prog} exit code {rc!r}")
            if len(lines) != 1 or "Traceback" in err or not lines[0].startswith(prefix):
                problems.append(f"{prog} stderr is not one `{prefix}...` line: {err!r}")
                continue
            msgs[prog] = msg = lines[0][len(prefix):]
            if m.text is not None:
                _, key, l1, l2 = m.text
                if f"duplicate key {key!r}" not in msg or f"lines {l1} and {l2}" not in msg or cfg.name not in msg:
                    problems.append(f"{prog} does not name the file, key {key!r} and lines {l1}, {l2}: {msg}")
            elif not re.search(rf"(^|\s){re.escape(m.expect)}(\.\w+)*: ", msg):  # the field or one inside it
                problems.append(f"{prog} does not name the field {m.expect!r}: {msg}")
        if len(msgs) == 2 and len(set(msgs.values())) != 1:
            problems.append(f"the backends differ: {msgs}")
        if problems:
            failures.append(f"{what}\n    " + "\n    ".join(problems))
        else:
            refused[m.category] += 1
    generated = Counter(m.category for _, m, _ in configs)
    summary = "\n".join([f"config fuzz (seed {SEED}): {len(configs)} malformed configs generated, "
                          f"{sum(refused.values())} refused alike by vpd-oracle and vpd-train (refused / generated):"]
                         + [f"  {cat:18s} {refused[cat]:4d} / {generated[cat]}" for cat in sorted(generated)])
    print(summary)  # in the test's captured output (`-rP`)
    with capsys.disabled():  # and on the terminal of a run without xdist
        print("\n" + summary)
    assert not failures, f"{len(failures)} of {len(configs)} configs mishandled:\n" + "\n".join(failures[:15])
