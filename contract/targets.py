"""Target definitions shared by both backends (framework-free).

A target is a safetensors file in Hugging Face layout (`Linear.weight` is `[out, in]`)
plus `<stem>.json` beside it: {"kind": ..., "config": {...}, "training": {...}}.
`module_table` lists every decomposable module of a target in the canonical order
(the order torch's `named_modules()` visits them); site expansion (S2) uses that order.
`expected_file_tensors` lists every tensor a weight file must hold (file layout),
`check_weight_file` is the one check both backends run on a weight file before loading it
(S96), and `rope_theta` reads a Llama's RoPE base with the refusals both backends share (S67).
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


# Both backends' llama forwards accept input embeddings [B, T, d] in place of token ids;
# those bypass `model.embed_tokens`, so that module cannot be a decomposed site then.
EMBEDS_VS_EMBED_SITE = ("input embeddings bypass model.embed_tokens, so it cannot be a decomposed site: "
                        "remove it from `sites` or pass token ids")


@dataclass(frozen=True)
class ModuleInfo:
    name: str  # module path in the target, e.g. "model.layers.0.mlp.up_proj"
    kind: str  # "linear" | "embedding"
    d_in: int  # linear: input features; embedding: vocab size
    d_out: int  # linear: output features; embedding: embedding dim
    has_bias: bool


def resolve_path(p: str | Path) -> Path:
    """Relative paths resolve against the repo root (configs are written that way)."""
    p = Path(p)
    return p if p.is_absolute() else REPO_ROOT / p


def meta_path(weights: str | Path) -> Path:
    w = resolve_path(weights)
    return w.with_suffix(".json")


def load_target_meta(weights: str | Path) -> dict:
    w = resolve_path(weights)
    if not w.is_file():
        raise FileNotFoundError(f"target.weights: weights file not found: {w}")
    m = meta_path(w)
    if not m.is_file():
        raise FileNotFoundError(f"target.weights: the target's JSON config {m} (beside {w.name}) is missing")
    meta = json.loads(m.read_text())
    for key in ("kind", "config"):
        if key not in meta:
            raise ValueError(f"target JSON {m} lacks the key '{key}'")
    return meta


def module_table(kind: str, cfg: dict) -> list[ModuleInfo]:
    if kind == "tms":
        f, h = cfg["n_features"], cfg["n_hidden"]
        return [ModuleInfo("linear1", "linear", f, h, False), ModuleInfo("linear2", "linear", h, f, True)]
    if kind == "resid_mlp":
        e, m = cfg["d_embed"], cfg["d_mlp"]
        out = []
        for i in range(cfg["n_layers"]):
            out.append(ModuleInfo(f"layers.{i}.mlp_in", "linear", e, m, False))
            out.append(ModuleInfo(f"layers.{i}.mlp_out", "linear", m, e, False))
        return out
    if kind == "llama":
        d, v = cfg["hidden_size"], cfg["vocab_size"]
        nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        hd = cfg.get("head_dim") or d // nh
        ff = cfg["intermediate_size"]
        ab, mb = bool(cfg.get("attention_bias", False)), bool(cfg.get("mlp_bias", False))
        out = [ModuleInfo("model.embed_tokens", "embedding", v, d, False)]
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}"
            out += [
                ModuleInfo(f"{p}.self_attn.q_proj", "linear", d, nh * hd, ab),
                ModuleInfo(f"{p}.self_attn.k_proj", "linear", d, nkv * hd, ab),
                ModuleInfo(f"{p}.self_attn.v_proj", "linear", d, nkv * hd, ab),
                ModuleInfo(f"{p}.self_attn.o_proj", "linear", nh * hd, d, ab),
                ModuleInfo(f"{p}.mlp.gate_proj", "linear", d, ff, mb),
                ModuleInfo(f"{p}.mlp.up_proj", "linear", d, ff, mb),
                ModuleInfo(f"{p}.mlp.down_proj", "linear", ff, d, mb),
            ]
        out.append(ModuleInfo("lm_head", "linear", d, v, False))
        return out
    raise ValueError(f"target.kind: unknown target kind {kind!r}")


def expected_file_tensors(kind: str, cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor a target's weight file must hold, with its shape in FILE (Hugging Face)
    layout: linear weights `[out, in]`, embeddings `[vocab, d]` (S71)."""
    out: dict[str, tuple[int, ...]] = {}
    for m in module_table(kind, cfg):
        if m.kind == "embedding":
            out[f"{m.name}.weight"] = (m.d_in, m.d_out)
        else:
            out[f"{m.name}.weight"] = (m.d_out, m.d_in)
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


def tied_lm_head(kind: str, cfg: dict) -> bool:
    """A llama target whose lm_head is its embedding (tie_word_embeddings): its file may omit
    `lm_head.weight` (Hugging Face's save_pretrained drops the tied copy)."""
    return kind == "llama" and bool(cfg.get("tie_word_embeddings", False))


class WeightFileError(ValueError):
    """A target weight file that cannot be loaded; the message names the file and the tensor."""


# The float dtypes both backends load (numpy reads them, so the JAX loader can; BF16 it cannot).
WEIGHT_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}
# Byte sizes of the other safetensors dtypes, to validate a file's layout before refusing them.
_OTHER_DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
                      "BF16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8}
_MAX_HEADER = 100_000_000  # the limit safetensors itself enforces


def _read_safetensors_header(path: Path, f, size: int) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], int]:
    """{name: (dtype, shape, begin, end)} of a safetensors file and the offset of its data
    section; raises WeightFileError on anything safetensors' own loader would refuse."""
    where = f"target.weights: {path}"
    if size < 8:
        raise WeightFileError(f"{where}: not a safetensors file ({size} bytes; truncated or empty)")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > min(_MAX_HEADER, size - 8):
        raise WeightFileError(f"{where}: not a safetensors file (header of {n} bytes in a {size}-byte file; truncated?)")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise WeightFileError(f"{where}: not a safetensors file (its header is not JSON; corrupt or truncated?)") from None
    if not isinstance(header, dict):
        raise WeightFileError(f"{where}: not a safetensors file (its header is not a JSON object)")
    out: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(e, dict) and isinstance(e.get("dtype"), str) and isinstance(e.get("shape"), list)
              and all(type(d) is int and d >= 0 for d in e["shape"])
              and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
              and all(type(o) is int and o >= 0 for o in e["data_offsets"]))
        if not ok:
            raise WeightFileError(f"{where}: tensor {name}: malformed header entry {e!r}")
        b, end = e["data_offsets"]
        out[name] = (e["dtype"], tuple(e["shape"]), b, end)
    data_size, pos = size - 8 - n, 0
    for name, (dt, shape, b, end) in sorted(out.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if end > data_size:
            raise WeightFileError(f"{where}: tensor {name}: its data runs to byte {end} of the data section but the "
                                  f"file holds {data_size} bytes (truncated file?)")
        if b != pos or end < b:
            raise WeightFileError(f"{where}: tensor {name}: data offsets [{b}, {end}] do not follow the previous "
                                  f"tensor (ends at {pos}); corrupt file")
        item = np.dtype(WEIGHT_DTYPES[dt]).itemsize if dt in WEIGHT_DTYPES else _OTHER_DTYPE_SIZES.get(dt)
        if item is not None and end - b != math.prod(shape) * item:
            raise WeightFileError(f"{where}: tensor {name}: {end - b} bytes of data for shape {shape} of {dt}; corrupt file")
        pos = end
    if pos != data_size:
        last = max(out, key=lambda k: out[k][3]) if out else None
        raise WeightFileError(f"{where}: {data_size - pos} bytes after the last tensor"
                              f"{f' ({last})' if last else ''}; corrupt file")
    return out, 8 + n


def check_weight_file(path: str | Path, kind: str, cfg: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The one check of a target weight file both backends run before loading it (S96):
    a readable, complete safetensors file holding exactly the tensors of
    `expected_file_tensors(kind, cfg)` (a tied llama may omit `lm_head.weight`), each of its
    file-layout shape, a float dtype both backends load (F16/F32/F64) and finite values.
    Returns {name: (dtype, shape)}; raises WeightFileError naming the file and the tensor.
    Reads the file only (the backends load it afterwards, unchanged)."""
    path = resolve_path(path)
    where = f"target.weights: {path}"
    want = expected_file_tensors(kind, cfg)
    optional = {"lm_head.weight"} if tied_lm_head(kind, cfg) else set()
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            header, data_start = _read_safetensors_header(path, f, size)
            missing = [k for k in want if k not in header and k not in optional]
            extra = [k for k in header if k not in want]
            if missing or extra:
                what = [f"missing tensor{'s' * (len(missing) > 1)} {', '.join(f'{k} {want[k]}' for k in missing)}"] * bool(missing)
                what += [f"unexpected tensor{'s' * (len(extra) > 1)} {', '.join(extra)}"] * bool(extra)
                raise WeightFileError(f"{where}: {'; '.join(what)} (a {kind!r} target as {meta_path(path).name} "
                                      "describes it holds exactly the tensors of contract.targets.expected_file_tensors)")
            for name, (dt, shape, b, end) in header.items():
                if dt not in WEIGHT_DTYPES:
                    raise WeightFileError(f"{where}: tensor {name} has dtype {dt}; a target weight must be "
                                          f"{', '.join(WEIGHT_DTYPES)}")
                if shape != want[name]:
                    raise WeightFileError(f"{where}: tensor {name} has shape {shape}, expected {want[name]} "
                                          "(Hugging Face [out, in] layout)")
                f.seek(data_start + b)
                a = np.fromfile(f, dtype=WEIGHT_DTYPES[dt], count=(end - b) // np.dtype(WEIGHT_DTYPES[dt]).itemsize)
                bad = int(a.size - np.count_nonzero(np.isfinite(a)))
                if bad:
                    raise WeightFileError(f"{where}: tensor {name} holds {bad} non-finite value{'s' * (bad > 1)} "
                                          f"(NaN or inf) of {a.size}")
    except OSError as e:
        raise WeightFileError(f"{where}: cannot read the weight file ({e.strerror or e})") from None
    return {k: (dt, shape) for k, (dt, shape, _, _) in header.items()}


# RoPE of a Hugging Face Llama config dict: `rope_parameters` (transformers 5) or
# `rope_scaling` (older) holds the type and possibly the base; older configs keep the base
# top-level as `rope_theta`. The base is never defaulted (S67, S93).
def _rope_parameters(cfg: dict) -> dict:
    return cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}


def rope_type(cfg: dict) -> str:
    rp = _rope_parameters(cfg)
    return rp.get("rope_type", rp.get("type", "default"))


def rope_base(cfg: dict) -> float | None:
    """The RoPE base of the config, or None when it names none."""
    theta = _rope_parameters(cfg).get("rope_theta", cfg.get("rope_theta"))
    return None if theta is None else float(theta)


def rope_theta(cfg: dict) -> float:
    """The RoPE base both backends use. Only the `default` rope type is implemented; another
    type, or a config without a base, is refused."""
    rtype = rope_type(cfg)
    if rtype != "default":
        raise NotImplementedError(f"target.config: rope_type {rtype!r} is not implemented (only 'default')")
    theta = rope_base(cfg)
    if theta is None:
        raise ValueError("target.config: no RoPE base (rope_parameters.rope_theta / rope_theta) in the target config")
    return theta
