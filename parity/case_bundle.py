"""Case bundles: ONE safetensors file that describes one VPD training step from scratch, for
any target (any Hugging Face Llama, or a TMS / ResidMLP toy), so a user can hand a failing
step to either backend without the repository's shipped weights, configs or data.

  python -m parity.case_bundle terms --case FILE --backend torch|jax
  python -m parity.case_bundle make --config configs/X.yaml --out FILE [--batch-step K] [--embeds]
        [--precision float32|float64] [--with-draws]

Tensors (names are `<prefix>.<rest>`):
  target.<name>             the target's weights, Hugging Face names and layout ([out, in])
  input.ids | input.embeds  llama: int token ids [B, T] OR float input embeddings [B, T, d]
  input.x                   tms / resid_mlp: features [B, n_features]
  init.<leaf>               optional: the whole trainable state (contract/init.py names);
                            absent -> contract.init.init_state(run) from the config's seed
  pin.ci_lower.<site>, pin.ci_upper.<site>                  optional pins [..., C]
  pin.route.t<i>.e<j>.d<k>  optional bool [..., n_live] (uniform_k entries only)
  pin.mask.t<i>.e<j>.d<k>.<site>                            optional [..., C]
  draw.<name>               optional draws of contract.draws.draw_plan; missing ones are
                            sampled with contract.draws.sample_numpy from (seed, step)
Metadata (strings; dicts as JSON): format = "vpd_case_bundle", target_kind
("llama" | "tms" | "resid_mlp"), target_config (the HF LlamaConfig dict / the toy's config),
run_config (the configs/*.yaml schema; target.weights is replaced), precision
(float32 | float64), step (optional, default 0: schedules and missing draws).

`terms` runs the step's forward and backward on exactly the bundle's state (no faithfulness
warmup, no optimizer update) and returns every term (`loss/<i>.<type>`), `loss/total`,
`grad_norm/<leaf>` and the pre-clip group norms `grad_norm/components`, `grad_norm/ci_fn`.
Both backends read the target through their usual loaders: `materialise` writes it to a
temporary directory in the contract's format (safetensors + `<stem>.json`).
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from contract.config import ConfigError, RunConfig, parse_config
from contract.draws import draw_plan, sample_numpy
from contract.resolve import ResolvedRun, resolve_run
from contract.targets import EMBEDS_VS_EMBED_SITE, module_table

FORMAT = "vpd_case_bundle"
PREFIXES = ("target", "input", "init", "pin", "draw")
KINDS = ("llama", "tms", "resid_mlp")
PRECISIONS = ("float32", "float64")
INPUTS = {"llama": ("ids", "embeds"), "tms": ("x",), "resid_mlp": ("x",)}
REQUIRED_CONFIG = {
    "llama": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "rms_norm_eps"),
    "tms": ("n_features", "n_hidden"),
    "resid_mlp": ("n_features", "d_embed", "d_mlp", "n_layers"),
}
EMBED_SITE = "model.embed_tokens"
_TAG = re.compile(r"t(\d+)\.e(\d+)\.d(\d+)")


class CaseBundleError(ValueError):
    """A malformed case bundle. The message names the bundle and the bad tensor or field."""


@dataclass
class CaseBundle:
    path: str
    target_kind: str
    target_config: dict
    target: dict[str, np.ndarray]  # Hugging Face names (without "target.")
    input_name: str  # ids | embeds | x
    input: np.ndarray
    run_config: dict
    precision: str
    step: int = 0
    init: dict[str, np.ndarray] | None = None
    pins: dict[str, np.ndarray] = field(default_factory=dict)  # names without "pin."
    draws: dict[str, np.ndarray] = field(default_factory=dict)  # names without "draw."

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.input.shape[:2]) if self.target_kind == "llama" else tuple(self.input.shape[:1])


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


# ---------------------------------------------------------------- structure
def _rope_theta(cfg: dict):
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return rp.get("rope_theta", cfg.get("rope_theta"))


def expected_target_tensors(kind: str, cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor a target needs, with its shape in Hugging Face (file) layout."""
    out: dict[str, tuple[int, ...]] = {}
    for m in module_table(kind, cfg):
        out[f"{m.name}.weight"] = (m.d_in, m.d_out) if m.kind == "embedding" else (m.d_out, m.d_in)
        if m.has_bias:
            out[f"{m.name}.bias"] = (m.d_out,)
    if kind == "resid_mlp":
        out["W_E"] = (cfg["n_features"], cfg["d_embed"])
    if kind == "llama":
        d = cfg["hidden_size"]
        for i in range(cfg["num_hidden_layers"]):
            out[f"model.layers.{i}.input_layernorm.weight"] = (d,)
            out[f"model.layers.{i}.post_attention_layernorm.weight"] = (d,)
        out["model.norm.weight"] = (d,)
    return out


def _tied(kind: str, cfg: dict) -> bool:
    return kind == "llama" and bool(cfg.get("tie_word_embeddings", False))


def _check_target(where: str, kind: str, cfg: dict, target: dict[str, np.ndarray]) -> None:
    missing_cfg = [k for k in REQUIRED_CONFIG[kind] if cfg.get(k) is None]
    if missing_cfg:
        raise CaseBundleError(f"{where}: metadata target_config lacks {missing_cfg} (needed by a {kind!r} target)")
    if kind == "llama":
        if _rope_theta(cfg) is None:
            raise CaseBundleError(f"{where}: metadata target_config has no RoPE base "
                                  "(rope_parameters.rope_theta or rope_theta)")
        if cfg.get("hidden_act", "silu") != "silu":
            raise CaseBundleError(f"{where}: target_config.hidden_act {cfg.get('hidden_act')!r} is not supported (only 'silu')")
    want = expected_target_tensors(kind, cfg)
    if _tied(kind, cfg):
        want.pop("lm_head.weight")  # may be omitted: it is the embedding
    for name in sorted(set(want) - set(target)):
        raise CaseBundleError(f"{where}: tensor target.{name} is missing (a {kind!r} target with this "
                              f"target_config needs it, shape {want[name]} in Hugging Face [out, in] layout)")
    for name in sorted(target):
        if name not in want and not (name == "lm_head.weight" and _tied(kind, cfg)):
            raise CaseBundleError(f"{where}: tensor target.{name} is not a tensor of a {kind!r} target "
                                  f"(expected: {', '.join(sorted(want)[:8])}, ...)")
        a = target[name]
        shape = want.get(name, want.get("model.embed_tokens.weight"))
        if tuple(a.shape) != tuple(shape):
            raise CaseBundleError(f"{where}: tensor target.{name} has shape {tuple(a.shape)}, expected {tuple(shape)} "
                                  "(Hugging Face [out, in] layout)")
        if not np.issubdtype(a.dtype, np.floating):
            raise CaseBundleError(f"{where}: tensor target.{name} has dtype {a.dtype}, expected a float dtype")


def _check_input(where: str, kind: str, cfg: dict, inputs: dict[str, np.ndarray]) -> tuple[str, np.ndarray]:
    allowed = INPUTS[kind]
    for n in inputs:
        if n not in allowed:
            raise CaseBundleError(f"{where}: tensor input.{n} is not an input of a {kind!r} target "
                                  f"(use {' or '.join('input.' + a for a in allowed)})")
    if len(inputs) > 1:
        raise CaseBundleError(f"{where}: both input.ids and input.embeds are present; give exactly one")
    if not inputs:
        raise CaseBundleError(f"{where}: no input tensor (give {' or '.join('input.' + a for a in allowed)})")
    (name, a), = inputs.items()
    if name == "ids":
        if not np.issubdtype(a.dtype, np.integer):
            raise CaseBundleError(f"{where}: tensor input.ids has dtype {a.dtype}, expected integer token ids")
        if a.ndim != 2:
            raise CaseBundleError(f"{where}: tensor input.ids has shape {tuple(a.shape)} (rank {a.ndim}), expected [B, T]")
        V = cfg["vocab_size"]
        if a.size and (a.min() < 0 or a.max() >= V):
            raise CaseBundleError(f"{where}: tensor input.ids holds ids in [{a.min()}, {a.max()}], outside [0, {V}) "
                                  "(target_config.vocab_size)")
        return name, a.astype(np.int64)
    if not np.issubdtype(a.dtype, np.floating):
        raise CaseBundleError(f"{where}: tensor input.{name} has dtype {a.dtype}, expected a float dtype")
    if name == "embeds":
        d = cfg["hidden_size"]
        if a.ndim != 3 or a.shape[-1] != d:
            raise CaseBundleError(f"{where}: tensor input.embeds has shape {tuple(a.shape)}, expected [B, T, {d}] "
                                  "(target_config.hidden_size)")
        return name, a
    f = cfg["n_features"]
    if a.ndim != 2 or a.shape[-1] != f:
        raise CaseBundleError(f"{where}: tensor input.x has shape {tuple(a.shape)}, expected [B, {f}] "
                              "(target_config.n_features)")
    return name, a


def _split(where: str, tensors: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    groups: dict[str, dict[str, np.ndarray]] = {p: {} for p in PREFIXES}
    for name, a in tensors.items():
        pre, _, rest = name.partition(".")
        if pre not in groups or not rest:
            raise CaseBundleError(f"{where}: tensor {name!r} has an unknown name; bundle tensors are "
                                  f"{', '.join(p + '.<name>' for p in PREFIXES)}")
        groups[pre][rest] = a
    return groups


def _meta_json(where: str, meta: dict, key: str, kind=dict):
    if key not in meta:
        raise CaseBundleError(f"{where}: metadata {key!r} is missing")
    try:
        v = json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise CaseBundleError(f"{where}: metadata {key!r} is not valid JSON: {e}") from None
    if not isinstance(v, kind):
        raise CaseBundleError(f"{where}: metadata {key!r} must hold a JSON {kind.__name__}")
    return v


def bundle_from_parts(where: str, tensors: dict[str, np.ndarray], meta: dict[str, str]) -> CaseBundle:
    """Structural checks that need no resolved run (names, target tensors vs target_config,
    the input). Run-dependent checks (sites, init, pins, draws) are in `materialise`."""
    if meta.get("format", FORMAT) != FORMAT:
        raise CaseBundleError(f"{where}: metadata format is {meta.get('format')!r}, expected {FORMAT!r}")
    kind = meta.get("target_kind")
    if kind not in KINDS:
        raise CaseBundleError(f"{where}: metadata target_kind is {kind!r}, expected one of {list(KINDS)}")
    tcfg = _meta_json(where, meta, "target_config")
    rcfg = _meta_json(where, meta, "run_config")
    prec = meta.get("precision")
    if prec not in PRECISIONS:
        raise CaseBundleError(f"{where}: metadata precision is {prec!r}, expected one of {list(PRECISIONS)}")
    try:
        step = int(meta.get("step", "0"))
    except ValueError:
        raise CaseBundleError(f"{where}: metadata step is {meta.get('step')!r}, expected an integer") from None
    if step < 0:
        raise CaseBundleError(f"{where}: metadata step is {step}, expected >= 0")
    g = _split(where, tensors)
    _check_target(where, kind, tcfg, g["target"])
    input_name, x = _check_input(where, kind, tcfg, g["input"])
    return CaseBundle(where, kind, tcfg, g["target"], input_name, x, rcfg, prec, step,
                      g["init"] or None, g["pin"], g["draw"])


def read_case_bundle(path: str | Path) -> CaseBundle:
    path = Path(path)
    if not path.is_file():
        raise CaseBundleError(f"case bundle not found: {path}")
    try:
        with safe_open(str(path), "np") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - a file that is not safetensors
        raise CaseBundleError(f"{path}: not a readable safetensors file ({e})") from None
    return bundle_from_parts(str(path), tensors, meta)


# ---------------------------------------------------------------- writing
def _np(a) -> np.ndarray:
    if hasattr(a, "detach"):  # torch
        a = a.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(a))


def _config_dict(c) -> dict:
    if isinstance(c, dict):
        return copy.deepcopy(c)
    if hasattr(c, "to_dict"):
        return c.to_dict()
    raise TypeError(f"expected a dict or an object with to_dict(), got {type(c).__name__}")


def normalise_llama_config(cfg: dict) -> dict:
    """Fill a Hugging Face Llama config's defaults (num_key_value_heads, head_dim,
    rope_parameters, ...) through transformers' LlamaConfig when it is installed."""
    try:
        from transformers import LlamaConfig
    except ImportError:
        return cfg
    return json.loads(json.dumps(LlamaConfig.from_dict(dict(cfg)).to_dict(), default=str))


def sync_run_config(run_config: dict, kind: str, batch_shape: tuple[int, ...], precision: str) -> dict:
    """The run config as stored in a bundle: target (weights replaced), batch_size and
    seq_len from the input, runtime.dtype = precision; a llama config without a token
    source gets 'corpus' (the bundle's input replaces the data stream anyway)."""
    d = copy.deepcopy(run_config)
    d["target"] = {"kind": kind, "weights": "<case bundle>"}
    d["batch_size"] = int(batch_shape[0])
    if kind == "llama":
        data = dict(d.get("data") or {})
        data["seq_len"] = int(batch_shape[1])
        if data.get("source", "features") == "features":
            data["source"] = "corpus"
        d["data"] = data
    d["runtime"] = {**(d.get("runtime") or {}), "dtype": precision}
    return d


def write_case_bundle(path: str | Path, *, target_kind: str, target_config, target: dict, run_config,
                      precision: str = "float64", input_ids=None, input_embeds=None, input_x=None,
                      init: dict | None = None, pins: dict | None = None, draws: dict | None = None,
                      step: int = 0, check: bool = True) -> Path:
    """Write one bundle. `target`: {HF tensor name: array [out, in]} (numpy or torch);
    `target_config`: dict or HF config object; `run_config`: dict or RunConfig (its
    target/batch_size/seq_len/dtype are synced to the bundle); `init`/`pins`/`draws`: flat
    dicts without their prefix. `check` validates the structure before writing."""
    path = Path(path)
    tcfg = _config_dict(target_config)
    if target_kind == "llama":
        tcfg = normalise_llama_config(tcfg)
    tensors: dict[str, np.ndarray] = {f"target.{k}": _np(v) for k, v in target.items()}
    given = {n: a for n, a in (("ids", input_ids), ("embeds", input_embeds), ("x", input_x)) if a is not None}
    tensors |= {f"input.{n}": _np(a) for n, a in given.items()}
    tensors |= {f"init.{k}": _np(v) for k, v in (init or {}).items()}
    tensors |= {f"pin.{k}": _np(v) for k, v in (pins or {}).items()}
    tensors |= {f"draw.{k}": _np(v) for k, v in (draws or {}).items()}
    rc = run_config.to_dict() if isinstance(run_config, RunConfig) else _config_dict(run_config)
    if len(given) == 1:
        x = next(iter(given.values()))
        bs = tuple(np.shape(x)[:2]) if target_kind == "llama" else tuple(np.shape(x)[:1])
        if len(bs) == (2 if target_kind == "llama" else 1):
            rc = sync_run_config(rc, target_kind, bs, precision)
    meta = {"format": FORMAT, "target_kind": target_kind, "target_config": json.dumps(tcfg),
            "run_config": json.dumps(rc), "precision": precision, "step": str(int(step))}
    if check:
        bundle_from_parts(str(path), tensors, meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


# ---------------------------------------------------------------- materialisation
def _check_init(where: str, run: ResolvedRun, init: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
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


def _check_draws(where: str, run: ResolvedRun, b: CaseBundle) -> tuple[dict, list[str]]:
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


def _check_pins(where: str, run: ResolvedRun, b: CaseBundle) -> dict[str, np.ndarray]:
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


def write_target_dir(b: CaseBundle, out_dir: Path) -> Path:
    """The bundle's target in the contract's format: `<dir>/target.safetensors` + `target.json`."""
    tensors = dict(b.target)
    if _tied(b.target_kind, b.target_config) and "lm_head.weight" not in tensors:
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
        d = copy.deepcopy(b.run_config)
        tgt = d.get("target") if isinstance(d.get("target"), dict) else {}
        if tgt.get("kind", b.target_kind) != b.target_kind:
            raise CaseBundleError(f"{where}: run_config.target.kind is {tgt.get('kind')!r} but metadata target_kind is {b.target_kind!r}")
        d["target"] = {"kind": b.target_kind, "weights": str(w)}
        rt = d.get("runtime") if isinstance(d.get("runtime"), dict) else {}
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
        init = _check_init(where, run, b.init)
        draws, sampled = _check_draws(where, run, b)
        pins = _check_pins(where, run, b)
        yield Materialised(b, run, init, b.input, draws, pins, sampled)


# ---------------------------------------------------------------- one step, no update
def _terms_torch(m: Materialised) -> dict[str, float]:
    import torch

    from oracle_torch.components import DecomposedModel
    from oracle_torch.train import forward_terms, hparams, make_params, torch_dtype

    run = m.run
    dt = torch_dtype(run.cfg.runtime.dtype)
    params = make_params(m.init, dt)
    model = DecomposedModel(run, params, dt)
    batch = torch.as_tensor(m.batch) if m.batch.dtype.kind in "iu" else torch.as_tensor(m.batch, dtype=dt)
    draws = {n: torch.as_tensor(a, dtype=dt) for n, a in m.draws.items()}
    pins = {n: torch.as_tensor(a) if a.dtype == np.bool_ else torch.as_tensor(a, dtype=dt) for n, a in m.pins.items()}
    total, terms, _ = forward_terms(run, model, params, batch, draws, hparams(run.cfg, m.bundle.step), pins=pins)
    total.backward()
    out = {f"loss/{k}": float(v.detach()) for k, v in terms.items()}
    out["loss/total"] = float(total.detach())
    norms = {}
    for n, p in params.items():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        norms[n] = torch.linalg.vector_norm(g)
        out[f"grad_norm/{n}"] = float(norms[n])
    for grp in ("components", "ci_fn"):  # pre-clip group norm as in clip_grad_norm (S43)
        leaves = [v for n, v in norms.items() if n.startswith(grp + ".")]
        out[f"grad_norm/{grp}"] = float(torch.linalg.vector_norm(torch.stack(leaves)))
    return out


def _terms_jax(m: Materialised, fast_compile: bool = False) -> dict[str, float]:
    import jax
    import jax.numpy as jnp

    from jax_impl.components import DecomposedModel
    from jax_impl.train import forward_terms, hparams, jax_dtype

    run = m.run
    dt = jax_dtype(run.cfg.runtime.dtype)
    model = DecomposedModel(run, dt)
    params = {n: jnp.asarray(a, dt) for n, a in m.init.items()}
    if m.batch.dtype.kind in "iu":
        batch = jnp.asarray(m.batch if jax.config.jax_enable_x64 else m.batch.astype(np.int32))
    else:
        batch = jnp.asarray(m.batch, dt)
    draws = {n: jnp.asarray(a, dt) for n, a in m.draws.items()}
    pins = {n: jnp.asarray(a) if a.dtype == np.bool_ else jnp.asarray(a, dt) for n, a in m.pins.items()}
    hp = {k: jnp.asarray(v, dt) for k, v in hparams(run.cfg, m.bundle.step).items()}

    def step(params, frozen, batch, draws, pins, hp):
        (total, (terms, _)), grads = jax.value_and_grad(
            lambda p: forward_terms(run, model, frozen, p, batch, draws, hp, None, pins), has_aux=True)(params)
        norms = {n: jnp.linalg.norm(g.ravel()) for n, g in grads.items()}
        return total, terms, norms

    args = (params, model.frozen, batch, draws, pins, hp)
    # fast_compile: XLA's backend (LLVM) optimisation level 0 -- about half the compile time, the
    # same HLO (results move by last-bit rounding only, ~2e-15 in float64); default = production
    options = {"xla_backend_optimization_level": 0} if fast_compile else {}
    f = jax.jit(step).lower(*args).compile(compiler_options=options)
    total, terms, norms = jax.device_get(f(*args))
    out = {f"loss/{k}": float(v) for k, v in terms.items()}
    out["loss/total"] = float(total)
    out |= {f"grad_norm/{n}": float(v) for n, v in norms.items()}
    for grp in ("components", "ci_fn"):  # pre-clip group norm as in clip_grad_norm (S43), in float64 on the host
        leaves = np.array([v for n, v in norms.items() if n.startswith(grp + ".")], dtype=np.float64)
        out[f"grad_norm/{grp}"] = float(np.linalg.norm(leaves))
    return out


def terms(path: str | Path | CaseBundle, backend: str, fast_compile: bool = False) -> dict[str, float]:
    """One step of the bundle on `backend` ("torch" | "jax"), no optimizer update: every
    term, the total, per-leaf gradient norms and the pre-clip group norms. JAX runs the
    step jitted (`fast_compile`: XLA backend optimisation level 0, for large targets).
    JAX float64 needs jax_enable_x64 on before JAX starts (the CLI sets it)."""
    if backend not in ("torch", "jax"):
        raise ValueError(f"backend: expected 'torch' or 'jax', got {backend!r}")
    with materialise(path) as m:
        out = _terms_torch(m) if backend == "torch" else _terms_jax(m, fast_compile)
    return dict(sorted(out.items()))


# ---------------------------------------------------------------- make from a shipped config
def make_from_config(config: str | Path, out: str | Path, batch_step: int = 0, embeds: bool = False,
                     precision: str | None = None, with_draws: bool = False) -> Path:
    """A bundle of a shipped config: weights from its target file, the batch of step
    `batch_step` (contract.data), the initial state from contract.init (no faithfulness
    warmup), draws of step 0 only if `with_draws` (else sampled when the bundle is read)."""
    from safetensors.numpy import load_file

    from contract.config import load_config
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
    ap = argparse.ArgumentParser(prog="python -m parity.case_bundle", description=__doc__,
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
