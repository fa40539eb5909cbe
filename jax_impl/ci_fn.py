"""Causal-importance functions over a flat parameter dict (SPEC S13-S17).
Mirrors oracle_torch/ci_fn.py function by function."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from contract.resolve import ResolvedRun


def gelu(x):
    return jax.nn.gelu(x, approximate=False)  # exact (erf) GELU


def n_layers(cfg) -> int:
    return len(cfg.ci_fn.hidden) + 1


def mlp(params, prefix: str, h, n: int):
    for i in range(n):
        h = h @ params[f"{prefix}.w{i}"] + params[f"{prefix}.b{i}"]
        if i < n - 1:
            h = gelu(h)
    return h


def per_component_mlp(params, prefix: str, h, n: int, shared_input: bool):
    """Each component its own MLP. h: [..., d_in] shared by all components
    (vector_mlp) or [..., C, 1] one scalar per component (mlp)."""
    for i in range(n):
        w, b = params[f"{prefix}.w{i}"], params[f"{prefix}.b{i}"]
        if i == 0 and shared_input:
            h = jnp.einsum("...i,cio->...co", h, w) + b
        else:
            h = jnp.einsum("...ci,cio->...co", h, w) + b
        if i < n - 1:
            h = gelu(h)
    return h[..., 0]


def rms_norm(x, eps: float):
    """Weightless RMS norm."""
    return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + eps)


def rope(x, base: float):
    """Rotate-half RoPE over positions 0..T-1. x: [B, T, H, hd]."""
    T, hd = x.shape[1], x.shape[-1]
    inv = base ** (-jnp.arange(0, hd, 2, dtype=x.dtype) / hd)
    ang = jnp.arange(T, dtype=x.dtype)[:, None] * inv[None, :]
    cos = jnp.concatenate([jnp.cos(ang), jnp.cos(ang)], -1)[None, :, None, :]
    sin = jnp.concatenate([jnp.sin(ang), jnp.sin(ang)], -1)[None, :, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + jnp.concatenate([-x2, x1], -1) * sin


def transformer(params, c, h):
    """global_shared_transformer body on h [B, T, d_model] (S17)."""
    B, T, d = h.shape
    H = c.n_heads
    hd = d // H
    for j in range(c.n_blocks):
        p = f"ci_fn.global.blocks.{j}"
        a = rms_norm(h, c.rms_eps)
        q = rope((a @ params[f"{p}.q"]).reshape(B, T, H, hd), c.rope_base)
        k = rope((a @ params[f"{p}.k"]).reshape(B, T, H, hd), c.rope_base)
        v = (a @ params[f"{p}.v"]).reshape(B, T, H, hd)
        att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / hd**0.5, axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, T, d)
        h = h + o @ params[f"{p}.o"]
        m = rms_norm(h, c.rms_eps)
        h = h + gelu(m @ params[f"{p}.mlp_w1"] + params[f"{p}.mlp_b1"]) @ params[f"{p}.mlp_w2"] + params[f"{p}.mlp_b2"]
    return rms_norm(h, c.rms_eps)


def split_sites(run: ResolvedRun, z):
    out, i = {}, 0
    for s in run.sites:
        out[s.name] = z[..., i:i + s.C]
        i += s.C
    return out


def ci_logits(run: ResolvedRun, params: dict, site_inputs: dict, inner_acts: dict) -> dict:
    """z per site. `inner_acts[s] = x_s . V_s` (not detached) feeds the `mlp` type."""
    c = run.cfg.ci_fn
    n = n_layers(run.cfg)
    if c.type == "mlp":
        return {s.name: per_component_mlp(params, f"ci_fn.{s.name}", inner_acts[s.name][..., None], n, False) for s in run.sites}
    if c.type == "vector_mlp":
        return {s.name: per_component_mlp(params, f"ci_fn.{s.name}", site_inputs[s.name], n, True) for s in run.sites}
    if c.type == "shared_mlp":
        return {s.name: mlp(params, f"ci_fn.{s.name}", site_inputs[s.name], n) for s in run.sites}
    if c.type == "global_shared_mlp":
        x = jnp.concatenate([site_inputs[s.name] for s in run.sites], -1)
        return split_sites(run, mlp(params, "ci_fn.global", x, n))
    if c.type == "global_shared_transformer":
        xs = [rms_norm(site_inputs[s.name], c.rms_eps) for s in run.sites]
        x = jnp.concatenate(xs, -1)
        no_seq = x.ndim == 2
        if no_seq:  # inputs without a sequence axis get a length-1 one
            x = x[:, None, :]
        h = x @ params["ci_fn.global.in_proj.w"] + params["ci_fn.global.in_proj.b"]
        z = transformer(params, c, h) @ params["ci_fn.global.out_proj.w"] + params["ci_fn.global.out_proj.b"]
        if no_seq:
            z = z[:, 0, :]
        return split_sites(run, z)
    raise ValueError(f"ci_fn.type: unknown {c.type!r}")
