"""The case-bundle file format: ONE safetensors file that describes one VPD training step
from scratch (`parity/case_bundle.py` runs it; docs/case_bundles.md). This module holds the
format's names, the `CaseBundle` a file reads into, the structural checks that need no
resolved run (names, target tensors vs target_config, the input, metadata), and the reader
and writer. Checks against the resolved run (sites, init, draws, pins) are in
`parity/case_checks.py`. Every refusal is a `CaseBundleError` naming the bad tensor or field.

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
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from contract.config import RunConfig
from contract.targets import expected_file_tensors, rope_base, rope_type

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



# ---------------------------------------------------------------- structure
def tied_lm_head(kind: str, cfg: dict) -> bool:
    """A llama target whose lm_head is its embedding (tie_word_embeddings)."""
    return kind == "llama" and bool(cfg.get("tie_word_embeddings", False))


def _check_target(where: str, kind: str, cfg: dict, target: dict[str, np.ndarray]) -> None:
    missing_cfg = [k for k in REQUIRED_CONFIG[kind] if cfg.get(k) is None]
    if missing_cfg:
        raise CaseBundleError(f"{where}: metadata target_config lacks {missing_cfg} (needed by a {kind!r} target)")
    if kind == "llama":
        if rope_type(cfg) != "default":  # refused by both backends (contract.targets.rope_theta)
            raise CaseBundleError(f"{where}: target_config rope_type {rope_type(cfg)!r} is not supported (only 'default')")
        if rope_base(cfg) is None:
            raise CaseBundleError(f"{where}: metadata target_config has no RoPE base "
                                  "(rope_parameters.rope_theta or rope_theta)")
        if cfg.get("hidden_act", "silu") != "silu":
            raise CaseBundleError(f"{where}: target_config.hidden_act {cfg.get('hidden_act')!r} is not supported (only 'silu')")
    want = expected_file_tensors(kind, cfg)
    if tied_lm_head(kind, cfg):
        want.pop("lm_head.weight")  # may be omitted: it is the embedding
    for name in sorted(set(want) - set(target)):
        raise CaseBundleError(f"{where}: tensor target.{name} is missing (a {kind!r} target with this "
                              f"target_config needs it, shape {want[name]} in Hugging Face [out, in] layout)")
    for name in sorted(target):
        if name not in want and not (name == "lm_head.weight" and tied_lm_head(kind, cfg)):
            raise CaseBundleError(f"{where}: tensor target.{name} is not a tensor of a {kind!r} target "
                                  f"(expected: {', '.join(sorted(want)[:8])}, ...)")
        a = target[name]
        shape = want[name] if name in want else want["model.embed_tokens.weight"]  # a tied lm_head
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


def _meta_json(where: str, meta: dict[str, str], key: str, kind: type = dict) -> Any:
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
