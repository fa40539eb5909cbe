"""Target definitions shared by both backends (framework-free).

A target is a safetensors file in Hugging Face layout (`Linear.weight` is `[out, in]`)
plus `<stem>.json` beside it: {"kind": ..., "config": {...}, "training": {...}}.
`module_table` lists every decomposable module of a target in the canonical order
(the order torch's `named_modules()` visits them); site expansion (S2) uses that order.
`expected_file_tensors` lists every tensor a weight file must hold (file layout), and
`rope_theta` reads a Llama's RoPE base with the refusals both backends share (S67).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

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
