"""Targets on the torch side: TMS, ResidMLP, and a Hugging Face Llama (SPEC S65-S67).

`build_target(kind, cfg)` builds a fresh (trainable) target from the hyper-parameters in the
target's JSON; `load_target(weights)` builds it and loads the shipped safetensors strictly;
`target_forward(model, kind, batch)` is the clean forward the trainer decomposes.

Precision of the Llama. Stock transformers computes RMSNorm, the RoPE cos/sin and the
eager attention softmax in float32 *whatever the working dtype*, which silently caps a
float64 model at float32 accuracy. Here those three places compute in
`promote_types(working dtype, float32)` instead: bit-identical to stock transformers in
float32 (and bf16, which upcasts to float32 as before), true float64 in float64.
The JAX mirror implements the same rule. Only the default RoPE type is supported, and its
base is read from the target's config, never defaulted (`contract.targets.rope_theta`, S67).
"""
from __future__ import annotations

import types
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from contract.targets import (
    EMBEDS_VS_EMBED_SITE,
    check_weight_file,
    load_target_meta,
    resolve_path,
    rope_theta,
    tied_lm_head,
)

ATTN_IMPL = "vpd_eager"  # eager attention with the softmax in promote(dtype, float32)


# ---------------------------------------------------------------- toy targets
class TMS(nn.Module):
    """Toy model of superposition: out = relu(linear2(linear1(x))).

    Pretrained with tied weights (linear2.weight = linear1.weight.T); the weight file stores
    both matrices explicitly, and VPD decomposes them as two untied sites."""

    def __init__(self, n_features: int, n_hidden: int):
        super().__init__()
        self.linear1 = nn.Linear(n_features, n_hidden, bias=False)
        self.linear2 = nn.Linear(n_hidden, n_features, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear2(self.linear1(x)))


class ResidMLPLayer(nn.Module):
    def __init__(self, d_embed: int, d_mlp: int):
        super().__init__()
        self.mlp_in = nn.Linear(d_embed, d_mlp, bias=False)
        self.mlp_out = nn.Linear(d_mlp, d_embed, bias=False)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return self.mlp_out(torch.relu(self.mlp_in(r)))


class ResidMLP(nn.Module):
    """Residual MLP: r = x W_E; r += mlp_out(relu(mlp_in(r))) per layer; out = r W_Eᵀ.

    `W_E` [n_features, d_embed] is a fixed buffer of random unit-norm rows (not trained);
    it is stored in the weight file. At build time it is drawn from its own generator
    seeded by `embed_seed` so building never touches the global torch RNG for it."""

    W_E: torch.Tensor  # a buffer (register_buffer below)

    def __init__(self, n_features: int, d_embed: int, d_mlp: int, n_layers: int, embed_seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(int(embed_seed))
        w = torch.randn(n_features, d_embed, generator=g, dtype=torch.float64)
        w = w / w.norm(dim=1, keepdim=True)
        self.register_buffer("W_E", w.to(torch.get_default_dtype()))
        self.layers = nn.ModuleList([ResidMLPLayer(d_embed, d_mlp) for _ in range(n_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = x @ self.W_E
        for layer in self.layers:
            r = r + layer(r)
        return r @ self.W_E.T


# ---------------------------------------------------------------- llama precision patches
def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _rmsnorm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    input_dtype = hidden_states.dtype
    h = hidden_states.to(_work_dtype(input_dtype))
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * h.to(input_dtype)


def _rotary_forward(self, x: torch.Tensor, position_ids: torch.Tensor):
    # Same ops as transformers' default RoPE, but in promote(x.dtype, float32): the inverse
    # frequencies are recomputed in that dtype (in float32 they equal the stock buffer).
    wd = _work_dtype(x.dtype)
    with torch.no_grad():
        inv_freq = 1.0 / (self._vpd_base ** (torch.arange(0, self._vpd_dim, 2, dtype=wd, device=x.device) / self._vpd_dim))
        freqs = position_ids[..., None].to(wd) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
    return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def _repeat_kv(h: torch.Tensor, n_rep: int) -> torch.Tensor:
    b, nkv, t, hd = h.shape
    if n_rep == 1:
        return h
    return h[:, :, None, :, :].expand(b, nkv, n_rep, t, hd).reshape(b, nkv * n_rep, t, hd)


def vpd_eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager attention with the softmax in promote(dtype, float32)."""
    key_states = _repeat_kv(key, module.num_key_value_groups)
    value_states = _repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=_work_dtype(query.dtype)).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    return attn_output.transpose(1, 2).contiguous(), attn_weights


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask

    if ATTN_IMPL not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_IMPL, vpd_eager_attention)
    if ATTN_IMPL not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(ATTN_IMPL, eager_mask)


def _build_llama(cfg: dict) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

    theta = rope_theta(cfg)  # the default RoPE only, its base from the config (refusals shared with JAX)
    _register_attention()
    config = LlamaConfig.from_dict(dict(cfg))
    config.use_cache = False
    config._attn_implementation = ATTN_IMPL
    model = LlamaForCausalLM(config)
    if model.config._attn_implementation != ATTN_IMPL:
        raise RuntimeError(f"could not select the attention implementation {ATTN_IMPL!r}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for m in model.modules():
        if isinstance(m, LlamaRMSNorm):
            m.forward = types.MethodType(_rmsnorm_forward, m)
        elif isinstance(m, LlamaRotaryEmbedding):
            # nn.Module.__setattr__ is annotated Tensor | Module, but a plain value is stored as an attribute
            m._vpd_base = theta  # pyright: ignore[reportArgumentType]
            m._vpd_dim = int(head_dim)  # pyright: ignore[reportArgumentType]
            m.forward = types.MethodType(_rotary_forward, m)
    return model


# ---------------------------------------------------------------- public API
def build_target(kind: str, cfg: dict) -> nn.Module:
    """A freshly initialised target (parameters from the global torch RNG, except W_E)."""
    if kind == "tms":
        return TMS(int(cfg["n_features"]), int(cfg["n_hidden"]))
    if kind == "resid_mlp":
        return ResidMLP(int(cfg["n_features"]), int(cfg["d_embed"]), int(cfg["d_mlp"]),
                        int(cfg["n_layers"]), int(cfg.get("embed_seed", 0)))
    if kind == "llama":
        return _build_llama(cfg)
    raise ValueError(f"target.kind: unknown target kind {kind!r}")


def load_target(weights_path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build the target described by `<stem>.json` beside `weights_path`, load its weights
    with strict key and shape checks, cast to `dtype`, eval mode, requires_grad False.
    Does not advance the global torch RNG."""
    path = resolve_path(weights_path)
    meta = load_target_meta(path)
    check_weight_file(path, meta["kind"], meta["config"])  # names, shapes, dtypes, finiteness (S96, shared with JAX)
    with torch.random.fork_rng(devices=[]):
        model = build_target(meta["kind"], meta["config"])
    tensors = load_file(str(path))
    if tied_lm_head(meta["kind"], meta["config"]) and "lm_head.weight" not in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # save_pretrained drops the tied copy
    # cast the module first, then load: a float64 file must not pass through float32
    model = model.to(dtype)
    model.load_state_dict({k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}, strict=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def target_forward(model: nn.Module, kind: str, batch: torch.Tensor) -> torch.Tensor:
    """llama: token ids [B, T] -> logits [B, T, V], or input embeddings [B, T, d] (floating)
    -> logits, which bypass `model.embed_tokens` (so it must not be a decomposed site);
    toys: features [B, F] -> output [B, F]. Floating inputs must already have the model's
    dtype (no silent casts)."""
    if kind == "llama":
        if batch.is_floating_point():
            if not isinstance(model.get_submodule("model.embed_tokens"), nn.Embedding):
                raise ValueError(EMBEDS_VS_EMBED_SITE)
            model_dtype = model.get_parameter("model.norm.weight").dtype
            if batch.dtype != model_dtype:
                raise TypeError(f"llama input embeddings are {batch.dtype}, the model is {model_dtype}")
            return model(inputs_embeds=batch, use_cache=False).logits
        return model(input_ids=batch.long(), use_cache=False).logits
    if kind in ("tms", "resid_mlp"):
        return model(batch)
    raise ValueError(f"target.kind: unknown target kind {kind!r}")
