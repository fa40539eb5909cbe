"""Tensor-layout contract: ONE declarative table for every tensor kind (framework-free).

Three places hold tensors:
  file  — the target weight files (Hugging Face safetensors: ``nn.Linear.weight`` is ``[out, in]``)
          and checkpoints written in "file" layout;
  torch — the torch oracle's in-memory tensors (``nn.Linear.weight`` is ``[out, in]`` too);
  jax   — the JAX trainer's pytrees (linear weights are right-multiply matrices ``[in, out]``,
          so a site computes ``x @ W + b``).

Each row of ``LAYOUT_TABLE`` names one tensor kind, says which flat tensor names belong to it
(a regular expression), spells out its axes in each of the three places, and names the
transform from file layout to torch layout and to JAX layout. Transforms are taken from the
small registry ``TRANSFORMS`` (each with its inverse), so every conversion in the code base is
``file_to_jax`` / ``jax_to_file`` / ``to_torch_layout`` / ``from_torch_layout`` /
``torch_to_jax`` / ``jax_to_torch`` reading this table — never an ad-hoc ``.T``.

Flat tensor names (the name space the table classifies):
  target tensors   — the names in the weight file, e.g. ``model.layers.0.mlp.up_proj.weight``,
                     ``linear2.bias``, ``W_E``, ``model.norm.weight``;
  components       — ``components.<site>.V`` / ``components.<site>.U`` (``<site>`` = module name);
  CI function      — ``ci_fn.<anything>``;
  adversary        — ``sources.<anything>`` (persistent-PGD sources, ``[..., C+1]``);
  optimizer state  — ``opt.<anything>.<param name>`` (a moment: same layout as its param, found by
                     stripping leading dotted segments until the rest classifies), and
                     ``opt.<anything>.count`` / ``.step`` scalars;
  counters         — ``step``.

numpy only: this module never imports torch or jax.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# ----------------------------------------------------------------------------------------------
# Transforms (each has an inverse; "transpose" swaps the two axes of a 2-D tensor)


def _identity(a):
    return a


def _transpose2d(a):
    if a.ndim != 2:
        raise ValueError(f"layout transform 'transpose' expects a 2-D tensor, got shape {tuple(a.shape)}")
    # numpy: return a contiguous copy (safetensors writes need C-contiguous buffers); other array
    # types (jax, torch) are handled by their own .transpose(1, 0) without importing them here.
    if isinstance(a, np.ndarray):
        return np.ascontiguousarray(a.T)
    return a.transpose(1, 0)


TRANSFORMS: dict[str, tuple[Callable, str]] = {
    # name: (function, name of the inverse transform)
    "identity": (_identity, "identity"),
    "transpose": (_transpose2d, "transpose"),
}


# ----------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class LayoutRow:
    kind: str  # tensor kind (what tensor_kind returns)
    pattern: str  # regular expression matched (fullmatch) against the flat tensor name
    file_layout: str  # axes in the weight file / file-layout checkpoint
    torch_layout: str  # axes in the torch oracle
    jax_layout: str  # axes in the JAX trainer
    file_to_torch: str  # transform name (key of TRANSFORMS)
    file_to_jax: str  # transform name (key of TRANSFORMS)
    note: str = ""


# Module names of decomposable LINEAR modules for every target kind (must cover
# contract.targets.module_table; tests/test_jax_targets.py checks that it does).
_LINEAR_MODULE = (
    r"(?:linear[12]"  # TMS
    r"|layers\.\d+\.mlp_(?:in|out)"  # ResidMLP
    r"|model\.layers\.\d+\.self_attn\.[qkvo]_proj"  # Llama attention
    r"|model\.layers\.\d+\.mlp\.(?:gate|up|down)_proj"  # Llama MLP
    r"|lm_head)"  # Llama unembedding
)
_EMBEDDING_MODULE = r"(?:model\.embed_tokens)"
_NORM_MODULE = r"(?:model\.norm|model\.layers\.\d+\.(?:input_layernorm|post_attention_layernorm))"

LAYOUT_TABLE: tuple[LayoutRow, ...] = (
    LayoutRow(
        "target_linear_weight", _LINEAR_MODULE + r"\.weight",
        "[out, in]", "[out, in]", "[in, out]", "identity", "transpose",
        "nn.Linear.weight; JAX right-multiplies (x @ W), so the JAX tensor is the transpose",
    ),
    LayoutRow(
        "target_linear_bias", _LINEAR_MODULE + r"\.bias",
        "[out]", "[out]", "[out]", "identity", "identity",
    ),
    LayoutRow(
        "target_embedding", _EMBEDDING_MODULE + r"\.weight",
        "[vocab, d]", "[vocab, d]", "[vocab, d]", "identity", "identity",
        "nn.Embedding.weight; a lookup W[token] in every framework",
    ),
    LayoutRow(
        "target_norm_weight", _NORM_MODULE + r"\.weight",
        "[d]", "[d]", "[d]", "identity", "identity", "RMSNorm scale",
    ),
    LayoutRow(
        "resid_embedding", r"W_E",
        "[n_features, d_embed]", "[n_features, d_embed]", "[n_features, d_embed]", "identity", "identity",
        "ResidMLP fixed embedding; the unembedding is W_E^T (a math op, not a layout change)",
    ),
    LayoutRow(
        "component_V", r"components\..+\.V",
        "[d_in, C]", "[d_in, C]", "[d_in, C]", "identity", "identity",
        "embedding sites: [vocab, C]",
    ),
    LayoutRow(
        "component_U", r"components\..+\.U",
        "[C, d_out]", "[C, d_out]", "[C, d_out]", "identity", "identity",
        "embedding sites: [C, d_emb]",
    ),
    LayoutRow(
        "ci_fn_param", r"ci_fn\..+",
        "as stored", "as stored", "as stored", "identity", "identity",
        "CI-function parameters are created by the project in one layout for both frameworks",
    ),
    LayoutRow(
        "adversary_source", r"sources\..+",
        "[*scope, C+1]", "[*scope, C+1]", "[*scope, C+1]", "identity", "identity",
        "persistent-PGD sources",
    ),
    LayoutRow(
        "optimizer_scalar", r"opt\..+\.(?:count|step)",
        "[]", "[]", "[]", "identity", "identity",
    ),
    LayoutRow(
        "optimizer_moment", r"opt\..+",
        "layout of its param", "layout of its param", "layout of its param", "@param", "@param",
        "'@param': the moment follows the transform of the param it belongs to",
    ),
    LayoutRow(
        "counter", r"step",
        "[]", "[]", "[]", "identity", "identity",
    ),
)

_COMPILED = tuple((row, re.compile(row.pattern)) for row in LAYOUT_TABLE)
_BY_KIND = {row.kind: row for row in LAYOUT_TABLE}


def _check_table() -> None:
    kinds = [r.kind for r in LAYOUT_TABLE]
    if len(set(kinds)) != len(kinds):
        raise AssertionError("LAYOUT_TABLE: duplicate kinds")
    for r in LAYOUT_TABLE:
        for t in (r.file_to_torch, r.file_to_jax):
            if t != "@param" and t not in TRANSFORMS:
                raise AssertionError(f"LAYOUT_TABLE row {r.kind}: unknown transform {t!r}")


_check_table()


# ----------------------------------------------------------------------------------------------
# Classification


def layout_row(kind: str) -> LayoutRow:
    return _BY_KIND[kind]


def tensor_kind(name: str) -> str:
    """The tensor kind of a flat tensor name (first matching row of LAYOUT_TABLE).

    Fails closed: an unknown name raises KeyError rather than silently passing through.
    """
    for row, rx in _COMPILED:
        if rx.fullmatch(name):
            return row.kind
    raise KeyError(f"layout: no LAYOUT_TABLE row matches tensor name {name!r}")


def moment_param_name(name: str) -> str:
    """For an optimizer moment ``opt.<...>.<param>``, the param's flat name.

    Leading dotted segments are stripped until the remainder classifies as a non-optimizer kind.
    """
    if not name.startswith("opt."):
        raise ValueError(f"layout: {name!r} is not an optimizer tensor")
    parts = name.split(".")
    for i in range(1, len(parts)):
        rest = ".".join(parts[i:])
        try:
            k = tensor_kind(rest)
        except KeyError:
            continue
        if not k.startswith("optimizer_"):
            return rest
    raise KeyError(f"layout: optimizer tensor {name!r} names no known param")


def _transform_name(name: str, kind: str | None, column: str) -> str:
    kind = kind or tensor_kind(name)
    t = getattr(_BY_KIND[kind], column)
    if t == "@param":
        p = moment_param_name(name)
        t = getattr(_BY_KIND[tensor_kind(p)], column)
    return t


def _apply(t: str, arr, inverse: bool):
    fn, inv = TRANSFORMS[t]
    if inverse:
        fn = TRANSFORMS[inv][0]
    return fn(arr)


# ----------------------------------------------------------------------------------------------
# Conversions (numpy in, numpy out; torch tensors are accepted where .transpose(1, 0) exists)


def file_to_jax(name: str, arr, kind: str | None = None):
    """File layout → JAX layout (e.g. a linear weight [out, in] → [in, out])."""
    return _apply(_transform_name(name, kind, "file_to_jax"), arr, inverse=False)


def jax_to_file(name: str, arr, kind: str | None = None):
    """JAX layout → file layout (inverse of file_to_jax)."""
    return _apply(_transform_name(name, kind, "file_to_jax"), arr, inverse=True)


def to_torch_layout(name: str, arr, kind: str | None = None):
    """File layout → torch-oracle layout."""
    return _apply(_transform_name(name, kind, "file_to_torch"), arr, inverse=False)


def from_torch_layout(name: str, arr, kind: str | None = None):
    """Torch-oracle layout → file layout."""
    return _apply(_transform_name(name, kind, "file_to_torch"), arr, inverse=True)


def torch_to_jax(name: str, arr, kind: str | None = None):
    """Torch-oracle layout → JAX layout (via the file layout)."""
    return file_to_jax(name, from_torch_layout(name, arr, kind), kind)


def jax_to_torch(name: str, arr, kind: str | None = None):
    """JAX layout → torch-oracle layout (via the file layout)."""
    return to_torch_layout(name, jax_to_file(name, arr, kind), kind)


def layout_transform(name: str, src: str, dst: str) -> str:
    """Name of the transform taking ``name`` from place ``src`` to ``dst`` (file | torch | jax).

    'identity' or 'transpose' (the only two; both are self-inverse). Used by diff/migration tools.
    """
    places = ("file", "torch", "jax")
    if src not in places or dst not in places:
        raise ValueError(f"layout places are {places}, got {src!r} → {dst!r}")
    col = {"torch": "file_to_torch", "jax": "file_to_jax"}
    a = "identity" if src == "file" else _transform_name(name, None, col[src])
    b = "identity" if dst == "file" else _transform_name(name, None, col[dst])
    # compose inverse(a) then b; with only identity/transpose (self-inverse) this is parity of swaps
    n_swaps = (a == "transpose") + (b == "transpose")
    return "transpose" if n_swaps % 2 else "identity"


def expected_shape(name: str, file_shape: tuple[int, ...], place: str) -> tuple[int, ...]:
    """The shape a tensor of ``file_shape`` (file layout) has in ``place`` (file | torch | jax)."""
    t = layout_transform(name, "file", place)
    if t == "transpose":
        if len(file_shape) != 2:
            raise ValueError(f"layout: {name!r} transposes but has shape {file_shape}")
        return (file_shape[1], file_shape[0])
    return tuple(file_shape)


def describe_table() -> str:
    """A human-readable rendering of LAYOUT_TABLE (for docs and the diff command)."""
    lines = ["kind | pattern | file | torch | jax | file→torch | file→jax"]
    for r in LAYOUT_TABLE:
        lines.append(
            f"{r.kind} | {r.pattern} | {r.file_layout} | {r.torch_layout} | {r.jax_layout} | "
            f"{r.file_to_torch} | {r.file_to_jax}"
        )
    return "\n".join(lines)
