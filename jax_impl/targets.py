"""Pure-functional JAX forwards of the three targets (TMS, ResidMLP, Llama).

Mirror of ``oracle_torch/targets.py``. Never imports torch or transformers.

Every decomposable module (every ``ModuleInfo`` of ``contract.targets.module_table``) is applied
through ``site(name, x)``, in module_table order, exactly once per forward; the default ``site``
is the frozen path ``frozen_site``. The trainer passes its own ``site`` to capture site inputs and
to run masked forwards, so nothing here may compute a decomposable module without calling it.

Frozen tensors keep their Hugging Face names and are converted to JAX layout by
``contract.layout.file_to_jax`` (linear weights become right-multiply ``[in, out]`` matrices).

Numerics of the Llama forward (written from the math of transformers' ``modeling_llama.py``):
  * RMSNorm, the RoPE tables and the attention softmax are computed in
    ``promote(dtype, float32)``: in float32 (and lower) this is exactly Hugging Face's float32
    upcast; in float64 everything stays float64. (Stock Hugging Face computes those three in
    float32 even when the model is float64, which caps a float64 model at ~1e-8 accuracy; the
    torch oracle lifts the same three float32 islands with the same rule.)
  * the RoPE base is read from the target's config (``rope_parameters.rope_theta`` in
    transformers 5, top-level ``rope_theta`` in older configs) by ``contract.targets.rope_theta``,
    shared with the oracle, and never defaulted; the same for ``rms_norm_eps``. Only the
    ``default`` rope type is implemented; others are refused.
  * matmuls use ``Precision.HIGHEST`` so accelerators do not silently drop to bf16 passes.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from contract.layout import file_to_jax, tensor_kind
from contract.targets import (
    EMBEDS_VS_EMBED_SITE,
    ModuleInfo,
    check_weight_file,
    load_target_meta,
    module_table,
    resolve_path,
    rope_theta,
    tied_lm_head,
)

SiteFn = Callable[[str, jnp.ndarray], jnp.ndarray]

_HI = jax.lax.Precision.HIGHEST


def _mm(x, w):
    return jnp.matmul(x, w, precision=_HI)


# ----------------------------------------------------------------------------------------------
# Loading


def _check_dtype(dtype) -> jnp.dtype:
    dt = jnp.dtype(dtype)
    if dt == jnp.float64 and not jax.config.read("jax_enable_x64"):
        raise ValueError(
            "float64 target requested but jax_enable_x64 is off; enable it before creating arrays "
            "(jax.config.update('jax_enable_x64', True) or JAX_ENABLE_X64=1)"
        )
    return dt


def load_frozen(weights_path: str | Path, dtype=jnp.float32) -> tuple[str, dict, dict[str, jnp.ndarray]]:
    """Read a target (safetensors + JSON beside it) → (kind, config, frozen tensors in JAX layout)."""
    dt = _check_dtype(dtype)
    meta = load_target_meta(weights_path)
    kind, cfg = meta["kind"], meta["config"]
    check_weight_file(weights_path, kind, cfg)  # names, shapes, dtypes, finiteness (S96, shared with the oracle)
    raw = load_file(str(resolve_path(weights_path)))
    if tied_lm_head(kind, cfg) and "lm_head.weight" not in raw:
        # save_pretrained drops the tied copy; the lm_head site still exists (file layout [V, d])
        raw["lm_head.weight"] = raw["model.embed_tokens.weight"]
    frozen: dict[str, jnp.ndarray] = {}
    for name, arr in raw.items():
        tensor_kind(name)  # every tensor of expected_file_tensors has a layout row (tests/test_jax_targets.py)
        a = np.asarray(file_to_jax(name, arr))
        frozen[name] = jnp.asarray(a, dtype=dt if np.issubdtype(a.dtype, np.floating) else a.dtype)
    return kind, cfg, frozen


# ----------------------------------------------------------------------------------------------
# Sites


def frozen_product(frozen: dict[str, jnp.ndarray], info: ModuleInfo, x: jnp.ndarray) -> jnp.ndarray:
    """``x @ W`` without the bias, or the embedding lookup ``W[x]``."""
    w = frozen[f"{info.name}.weight"]
    if info.kind == "embedding":
        return jnp.take(w, x, axis=0)
    if info.kind != "linear":
        raise ValueError(f"module {info.name}: unknown module kind {info.kind!r}")
    return _mm(x, w)


def frozen_site(frozen: dict[str, jnp.ndarray], info: ModuleInfo, x: jnp.ndarray) -> jnp.ndarray:
    """Frozen path of one decomposable module: ``x @ W (+ b)`` or the embedding lookup ``W[x]``."""
    y = frozen_product(frozen, info, x)
    if info.kind == "linear" and info.has_bias:
        y = y + frozen[f"{info.name}.bias"]
    return y


def default_site(kind: str, cfg: dict, frozen: dict[str, jnp.ndarray]) -> SiteFn:
    table = {m.name: m for m in module_table(kind, cfg)}

    def site(name: str, x: jnp.ndarray) -> jnp.ndarray:
        return frozen_site(frozen, table[name], x)

    return site


# ----------------------------------------------------------------------------------------------
# Llama pieces


def _compute_dtype(dt) -> jnp.dtype:
    return jnp.promote_types(dt, jnp.float32)


def rms_norm(x: jnp.ndarray, weight: jnp.ndarray, eps: float) -> jnp.ndarray:
    cd = _compute_dtype(x.dtype)
    h = x.astype(cd)
    var = jnp.mean(h * h, axis=-1, keepdims=True)
    h = h * jax.lax.rsqrt(var + jnp.asarray(eps, cd))
    return weight * h.astype(x.dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float, dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin of shape [T, head_dim] (frequencies duplicated, rotate-half convention)."""
    cd = _compute_dtype(dtype)
    inv_freq = 1.0 / (jnp.asarray(theta, cd) ** (jnp.arange(0, head_dim, 2, dtype=cd) / head_dim))
    pos = jnp.arange(seq_len, dtype=cd)
    freqs = pos[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x: jnp.ndarray) -> jnp.ndarray:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x [B, T, H, hd]; cos/sin [T, hd]."""
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return x * c + rotate_half(x) * s


Block = Callable[[Callable[[jnp.ndarray], jnp.ndarray]], Callable[[jnp.ndarray], jnp.ndarray]]


def _whole(f):
    return f


def llama_forward(cfg: dict, frozen: dict[str, jnp.ndarray], ids: jnp.ndarray, site: SiteFn,
                  block: Block = _whole) -> jnp.ndarray:
    if cfg.get("hidden_act", "silu") != "silu":
        raise NotImplementedError(f"target.config: hidden_act {cfg.get('hidden_act')!r} is not implemented (only silu)")
    d = cfg["hidden_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or d // nh
    if nh % nkv:
        raise ValueError(f"target.config: num_attention_heads {nh} not divisible by num_key_value_heads {nkv}")
    rep = nh // nkv
    eps = float(cfg["rms_norm_eps"])
    theta = rope_theta(cfg)
    if jnp.issubdtype(ids.dtype, jnp.floating):
        # input embeddings [B, T, d]: the model.embed_tokens module is bypassed
        if "model.embed_tokens" in getattr(site, "decomposed", ()):
            raise ValueError(EMBEDS_VS_EMBED_SITE)
        if ids.dtype != frozen["model.norm.weight"].dtype:
            raise TypeError(f"llama input embeddings are {ids.dtype}, the model is {frozen['model.norm.weight'].dtype}")
        B, T = ids.shape[:2]
        h = ids
    else:
        B, T = ids.shape
        h = site("model.embed_tokens", ids)  # [B, T, d]
    dt = h.dtype
    cos, sin = rope_tables(T, hd, theta, dt)
    scale = jnp.asarray(hd ** -0.5, dt)
    causal = jnp.tril(jnp.ones((T, T), dtype=bool))
    neg = jnp.asarray(jnp.finfo(dt).min, dt)

    def layer(p: str, h: jnp.ndarray) -> jnp.ndarray:
        x = rms_norm(h, frozen[f"{p}.input_layernorm.weight"], eps)
        q = site(f"{p}.self_attn.q_proj", x).reshape(B, T, nh, hd)
        k = site(f"{p}.self_attn.k_proj", x).reshape(B, T, nkv, hd)
        v = site(f"{p}.self_attn.v_proj", x).reshape(B, T, nkv, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # query head j uses kv head j // rep (Hugging Face repeat_kv order)
        qg = q.reshape(B, T, nkv, rep, hd)
        scores = jnp.einsum("btgrh,bsgh->bgrts", qg, k, precision=_HI) * scale
        scores = jnp.where(causal, scores, neg)
        probs = jax.nn.softmax(scores.astype(_compute_dtype(dt)), axis=-1).astype(dt)
        a = jnp.einsum("bgrts,bsgh->btgrh", probs, v, precision=_HI).reshape(B, T, nh * hd)
        h = h + site(f"{p}.self_attn.o_proj", a)

        x = rms_norm(h, frozen[f"{p}.post_attention_layernorm.weight"], eps)
        g = site(f"{p}.mlp.gate_proj", x)
        u = site(f"{p}.mlp.up_proj", x)
        return h + site(f"{p}.mlp.down_proj", jax.nn.silu(g) * u)

    for i in range(cfg["num_hidden_layers"]):
        h = block(partial(layer, f"model.layers.{i}"))(h)

    h = rms_norm(h, frozen["model.norm.weight"], eps)
    return site("lm_head", h)


# ----------------------------------------------------------------------------------------------
# Entry point


def target_forward(
    kind: str,
    cfg: dict,
    frozen: dict[str, jnp.ndarray],
    inputs: jnp.ndarray,
    site: SiteFn | None = None,
    block: Block = _whole,
) -> jnp.ndarray:
    """Run a target. Every module of ``module_table(kind, cfg)`` goes through ``site`` once, in order.

    ``block(f)`` wraps each layer of the network, ``f`` (the residual stream in, out: a Llama decoder
    layer, a ResidMLP MLP block; TMS is one block), e.g. in ``jax.checkpoint`` (jax_impl/remat.py);
    the default is ``f`` itself.

    TMS / ResidMLP: inputs [..., n_features] → [..., n_features]; Llama: token ids [B, T] → logits [B, T, V],
    or input embeddings [B, T, d] (floating) → logits: those skip ``model.embed_tokens``, which must then
    not be a decomposed site (the trainer's ``site`` lists its sites in ``site.decomposed``).
    """
    if site is None:
        site = default_site(kind, cfg, frozen)
    if kind == "tms":
        return block(lambda x: jax.nn.relu(site("linear2", site("linear1", x))))(inputs)
    if kind == "resid_mlp":
        w_e = frozen["W_E"]  # [n_features, d_embed]
        r = _mm(inputs, w_e)
        def mlp_block(i: int, r: jnp.ndarray) -> jnp.ndarray:
            return r + site(f"layers.{i}.mlp_out", jax.nn.relu(site(f"layers.{i}.mlp_in", r)))

        for i in range(cfg["n_layers"]):
            r = block(partial(mlp_block, i))(r)
        # unembedding W_U = W_E^T (the math of the target, not a layout change)
        return jnp.einsum("...e,fe->...f", r, w_e, precision=_HI)
    if kind == "llama":
        return llama_forward(cfg, frozen, inputs, site, block)
    raise ValueError(f"target.kind: unknown target kind {kind!r}")
