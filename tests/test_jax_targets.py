"""JAX target forwards (jax_impl/targets.py) and the tensor-layout table (contract/layout.py).

* Llama: JAX logits equal Hugging Face transformers' logits for the same weight file
  (non-square shapes, GQA, non-default RoPE base and RMS eps): max abs diff <= 1e-5 in float32
  (against stock transformers) and <= 1e-12 in float64 (against transformers with its three
  float32 islands — RMSNorm, RoPE tables, attention softmax — lifted to float64, which is what the
  torch oracle does; the stock-transformers float64 difference, ~1e-8, is printed for reference).
* the site hook is called once per module_table entry, in order, and a site returning the frozen
  path reproduces the default forward bit for bit;
* TMS and ResidMLP equal a plain numpy computation from the weight file;
* the layout table round-trips and transposes exactly the linear weights.

float64 JAX runs in a subprocess with JAX_ENABLE_X64=1: the x64 flag is process-global, so this
module never flips it in the pytest process (safe under pytest-xdist and for other test modules).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file as np_load_file, save_file as np_save_file

from contract import layout
from contract.targets import REPO_ROOT, WEIGHTS_DIR, expected_file_tensors, load_target_meta, module_table
from jax_impl.targets import frozen_site, load_frozen, target_forward

# Tolerances (max abs difference of outputs / logits).
TOL_FP32 = 1e-5  # float32: reassociation differences between XLA and torch kernels
TOL_FP64 = 1e-12  # float64: same math in both frameworks; anything algorithmic shows far above

LLAMA_CFG: dict[str, Any] = dict(
    vocab_size=67, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
    num_attention_heads=3, num_key_value_heads=1, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    max_position_embeddings=64, tie_word_embeddings=False,
)
TMS_CFG = dict(n_features=7, n_hidden=3)
RESID_CFG = dict(n_features=11, d_embed=13, d_mlp=5, n_layers=2)


# ----------------------------------------------------------------------------------------------
# helpers


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _ids(vocab: int, shape=(3, 17), seed=1) -> np.ndarray:
    return _rng(seed).integers(0, vocab, size=shape).astype(np.int64)


_FP64_SCRIPT = r"""
import sys
import numpy as np
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
from jax_impl.targets import load_frozen, target_forward
weights, inp, out = sys.argv[1:4]
kind, cfg, frozen = load_frozen(weights, jnp.float64)
assert all(v.dtype == jnp.float64 for v in frozen.values() if jnp.issubdtype(v.dtype, jnp.floating))
y = target_forward(kind, cfg, frozen, jnp.asarray(np.load(inp)))
assert y.dtype == jnp.float64, y.dtype
np.save(out, np.asarray(y))
"""

_fp64_cache: dict[tuple[str, bytes], np.ndarray] = {}


def jax_forward_fp64(weights: Path, x: np.ndarray, workdir: Path) -> np.ndarray:
    """JAX float64 forward in a fresh interpreter with x64 enabled (never in this process)."""
    key = (str(weights), x.tobytes() + str(x.dtype).encode() + str(x.shape).encode())
    if key in _fp64_cache:
        return _fp64_cache[key]
    workdir.mkdir(parents=True, exist_ok=True)
    inp, out = workdir / f"in_{len(_fp64_cache)}.npy", workdir / f"out_{len(_fp64_cache)}.npy"
    np.save(inp, x)
    env = dict(os.environ)
    env.update(JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    r = subprocess.run(
        [sys.executable, "-c", _FP64_SCRIPT, str(weights), str(inp), str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    if r.returncode != 0:
        raise AssertionError(f"float64 JAX subprocess failed (rc {r.returncode}):\n{r.stderr[-4000:]}")
    y = np.load(out)
    assert y.dtype == np.float64
    _fp64_cache[key] = y
    return y


def jax_forward_fp32(weights: Path, x: np.ndarray) -> np.ndarray:
    kind, cfg, frozen = load_frozen(weights, jnp.float32)
    xin = jnp.asarray(x, jnp.int32) if np.issubdtype(x.dtype, np.integer) else jnp.asarray(x, jnp.float32)
    y = np.asarray(target_forward(kind, cfg, frozen, xin))
    assert y.dtype == np.float32
    return y


def _write_target(path: Path, kind: str, cfg: dict, tensors: dict[str, np.ndarray]) -> Path:
    np_save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({"kind": kind, "config": cfg, "training": {}}))
    return path


def _toy_tensors(kind: str, cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """Random toy-target tensors in FILE layout (nn.Linear.weight [out, in])."""
    g = _rng(seed)
    t = {}
    for m in module_table(kind, cfg):
        t[f"{m.name}.weight"] = g.normal(0, 1 / np.sqrt(m.d_in), (m.d_out, m.d_in)).astype(np.float32)
        if m.has_bias:
            t[f"{m.name}.bias"] = g.normal(0, 0.3, (m.d_out,)).astype(np.float32)
    if kind == "resid_mlp":
        w = g.normal(size=(cfg["n_features"], cfg["d_embed"]))
        t["W_E"] = (w / np.linalg.norm(w, axis=1, keepdims=True)).astype(np.float32)
    return t


def _toy_inputs(kind: str, cfg: dict, seed: int = 5, batch: int = 6) -> np.ndarray:
    g = _rng(seed)
    n = cfg["n_features"]
    return g.uniform(-1 if kind == "resid_mlp" else 0, 1, (batch, n)) * (g.uniform(size=(batch, n)) < 0.5)


def numpy_toy_forward(kind: str, cfg: dict, t: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Reference straight from the file in float64, in torch's convention y = x Wᵀ + b."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    x = x.astype(np.float64)
    if kind == "tms":
        h = x @ t["linear1.weight"].T
        return np.maximum(h @ t["linear2.weight"].T + t["linear2.bias"], 0)
    r = x @ t["W_E"]
    for i in range(cfg["n_layers"]):
        a = np.maximum(r @ t[f"layers.{i}.mlp_in.weight"].T, 0)
        r = r + a @ t[f"layers.{i}.mlp_out.weight"].T
    return r @ t["W_E"].T


def _torch():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return torch


def _build_hf_llama(cfg: dict, seed: int):
    """A random float32 LlamaForCausalLM with weights large enough for O(1) logits."""
    torch = _torch()
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**cfg)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(1 + 0.2 * torch.randn_like(p))
                elif "embed_tokens" in name:  # (also the unembedding when tied: keep logits O(1))
                    p.normal_(0, 1.0 if not cfg.get("tie_word_embeddings") else 1.5 / p.shape[1] ** 0.5)
                elif p.ndim == 2:  # nn.Linear.weight [out, in]
                    p.normal_(0, 1.2 / p.shape[1] ** 0.5)
                else:  # biases
                    p.normal_(0, 0.1)
    return model


def _save_hf_llama(model, dest: Path) -> Path:
    """save_pretrained → move model.safetensors to <dest>, write <dest>.json in the contract's format."""
    hf_dir = dest.parent / (dest.stem + "_hf")
    model.save_pretrained(hf_dir)
    (hf_dir / "model.safetensors").rename(dest)
    dest.with_suffix(".json").write_text(
        json.dumps({"kind": "llama", "config": model.config.to_dict(), "training": {}})
    )
    return dest


def _hf_from_file(weights: Path):
    """Stock transformers model loaded from a contract weight file (independent of our loader)."""
    torch = _torch()
    from transformers import LlamaConfig, LlamaForCausalLM

    meta = load_target_meta(weights)
    config = LlamaConfig.from_dict(dict(meta["config"]))
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).eval()
    sd = {k: torch.from_numpy(v) for k, v in np_load_file(str(weights)).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= ({"lm_head.weight"} if config.tie_word_embeddings else set()), missing
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def _lift_hf_float32_islands(monkeypatch):
    """Make transformers' RMSNorm and RoPE compute in promote(dtype, float32) (stock: float32).

    In float32 this is the stock computation; in float64 it is true float64. (Attention runs
    through sdpa, which has no float32 island.) Same rule as jax_impl/targets.py and the oracle.
    """
    torch = _torch()
    from transformers.models.llama import modeling_llama as ml

    def rms_forward(self, x):
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)

    def rope_forward(self, x, position_ids):
        cd = torch.promote_types(x.dtype, torch.float32)
        base = float(self.config.rope_parameters["rope_theta"])
        dim = getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=cd) / dim))
        freqs = position_ids[..., None].to(cd) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)

    monkeypatch.setattr(ml.LlamaRMSNorm, "forward", rms_forward)
    monkeypatch.setattr(ml.LlamaRotaryEmbedding, "forward", rope_forward)


def _hf_logits(model, ids: np.ndarray, dtype) -> np.ndarray:
    torch = _torch()
    m = model.to(dtype)
    with torch.no_grad():
        out = m(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    model.to(torch.float32)
    return out


def _max_abs(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _check_llama_against_hf(weights: Path, model, ids: np.ndarray, workdir: Path, monkeypatch, label: str,
                            scale_tol: bool = False):
    """Absolute tolerances for the synthetic models (logits O(1)); with ``scale_tol`` (shipped,
    trained weights whose logits can be O(10)) they are multiplied by max(1, max|logit|)."""
    torch = _torch()
    ref32 = _hf_logits(model, ids, torch.float32)  # stock transformers, float32
    got32 = jax_forward_fp32(weights, ids)
    d32 = _max_abs(got32, ref32)

    got64 = jax_forward_fp64(weights, ids, workdir)
    stock64 = _hf_logits(model, ids, torch.float64)
    _lift_hf_float32_islands(monkeypatch)
    ref64 = _hf_logits(model, ids, torch.float64)
    d64 = _max_abs(got64, ref64)
    d64_stock = _max_abs(got64, stock64)
    scale = float(np.max(np.abs(ref64)))
    print(f"\n[{label}] logits max|.|={scale:.3g}  max abs diff JAX vs transformers: "
          f"float32 {d32:.3e}  float64 {d64:.3e}  (float64 vs STOCK transformers with its float32 "
          f"islands: {d64_stock:.3e})")
    k = max(1.0, scale) if scale_tol else 1.0
    assert d32 <= TOL_FP32 * k, f"[{label}] float32 logits differ by {d32:.3e} > {TOL_FP32 * k:.3e}"
    assert d64 <= TOL_FP64 * k, f"[{label}] float64 logits differ by {d64:.3e} > {TOL_FP64 * k:.3e}"
    return d32, d64


# ----------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    model = _build_hf_llama(LLAMA_CFG, seed=0)
    return _save_hf_llama(model, d / "tiny_test_llama.safetensors"), model


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("toys")
    out = {}
    for kind, cfg, seed in (("tms", TMS_CFG, 11), ("resid_mlp", RESID_CFG, 12)):
        t = _toy_tensors(kind, cfg, seed)
        out[kind] = (_write_target(d / f"{kind}.safetensors", kind, cfg, t), cfg, t)
    return out


# ----------------------------------------------------------------------------------------------
# layout table


def test_layout_linear_weight_nonsquare_is_transposed_for_jax():
    name = "model.layers.0.mlp.up_proj.weight"
    w = np.arange(15, dtype=np.float32).reshape(5, 3)  # file [out=5, in=3]
    assert layout.tensor_kind(name) == "target_linear_weight"
    j = layout.file_to_jax(name, w)
    assert j.shape == (3, 5)  # JAX [in, out]
    assert np.array_equal(j, w.T)
    assert j.flags["C_CONTIGUOUS"]
    assert np.array_equal(layout.jax_to_file(name, j), w)
    assert np.array_equal(layout.to_torch_layout(name, w), w)  # torch keeps [out, in]
    assert np.array_equal(layout.torch_to_jax(name, w), w.T)
    assert np.array_equal(layout.jax_to_torch(name, j), w)
    assert layout.layout_transform(name, "file", "jax") == "transpose"
    assert layout.layout_transform(name, "torch", "jax") == "transpose"
    assert layout.layout_transform(name, "file", "torch") == "identity"
    assert layout.expected_shape(name, (5, 3), "jax") == (3, 5)
    assert layout.expected_shape(name, (5, 3), "torch") == (5, 3)


ROUNDTRIP_CASES = [
    ("model.layers.1.self_attn.k_proj.weight", "target_linear_weight", (16, 48), True),
    ("linear2.weight", "target_linear_weight", (7, 3), True),
    ("layers.0.mlp_in.weight", "target_linear_weight", (5, 13), True),
    ("lm_head.weight", "target_linear_weight", (67, 48), True),
    ("linear2.bias", "target_linear_bias", (7,), False),
    ("model.layers.0.mlp.down_proj.bias", "target_linear_bias", (48,), False),
    ("model.embed_tokens.weight", "target_embedding", (67, 48), False),
    ("model.norm.weight", "target_norm_weight", (48,), False),
    ("model.layers.3.post_attention_layernorm.weight", "target_norm_weight", (48,), False),
    ("W_E", "resid_embedding", (11, 13), False),
    ("components.model.layers.0.mlp.up_proj.V", "component_V", (48, 9), False),
    ("components.linear1.U", "component_U", (9, 3), False),
    ("ci_fn.model.layers.0.mlp.up_proj.layers.0.W", "ci_fn_param", (4, 6), False),
    ("sources.pgd0.lm_head", "adversary_source", (1, 17, 10), False),
    ("opt.components.mu.components.linear1.V", "optimizer_moment", (7, 4), False),
    ("opt.target.nu.model.layers.0.mlp.up_proj.weight", "optimizer_moment", (80, 48), True),
    ("opt.components.count", "optimizer_scalar", (), False),
    ("step", "counter", (), False),
]


@pytest.mark.parametrize("name,kind,shape,transposed", ROUNDTRIP_CASES, ids=[c[0] for c in ROUNDTRIP_CASES])
def test_layout_roundtrip(name, kind, shape, transposed):
    a = _rng(3).normal(size=shape).astype(np.float32)
    assert layout.tensor_kind(name) == kind
    j = layout.file_to_jax(name, a)
    assert (layout.layout_transform(name, "file", "jax") == "transpose") == transposed
    assert j.shape == (tuple(reversed(shape)) if transposed else shape)
    back = layout.jax_to_file(name, j)
    assert back.dtype == a.dtype and back.shape == a.shape and back.tobytes() == a.tobytes()
    t = layout.to_torch_layout(name, a)
    assert layout.from_torch_layout(name, t).tobytes() == a.tobytes()
    assert layout.jax_to_torch(name, layout.torch_to_jax(name, t)).tobytes() == t.tobytes()


def test_layout_unknown_names_fail_closed():
    for bad in ("foo.bar", "model.layers.0.mlp.mystery_proj.weight", "linear3.weight", "opt.components.mu.nothing"):
        with pytest.raises(KeyError):
            layout.file_to_jax(bad, np.zeros((2, 3)))


def test_layout_table_is_well_formed():
    kinds = [r.kind for r in layout.LAYOUT_TABLE]
    assert len(kinds) == len(set(kinds))
    for r in layout.LAYOUT_TABLE:
        for t in (r.file_to_torch, r.file_to_jax):
            assert t == "@param" or t in layout.TRANSFORMS
    assert "target_linear_weight" in layout.describe_table()


@pytest.mark.parametrize("kind,cfg", [
    ("tms", TMS_CFG),
    ("resid_mlp", RESID_CFG),
    ("llama", dict(LLAMA_CFG, attention_bias=True, mlp_bias=True)),
])
def test_layout_covers_module_table(kind, cfg):
    for m in module_table(kind, cfg):
        want = "target_embedding" if m.kind == "embedding" else "target_linear_weight"
        assert layout.tensor_kind(f"{m.name}.weight") == want, m.name
        if m.has_bias:
            assert layout.tensor_kind(f"{m.name}.bias") == "target_linear_bias", m.name
        assert layout.tensor_kind(f"components.{m.name}.V") == "component_V"
        assert layout.tensor_kind(f"components.{m.name}.U") == "component_U"
    for name in expected_file_tensors(kind, cfg):
        layout.tensor_kind(name)  # every file tensor classifies


def test_layout_covers_every_hf_llama_tensor():
    _torch()
    cfg = dict(LLAMA_CFG, attention_bias=True, mlp_bias=True)
    model = _build_hf_llama(cfg, seed=4)
    table = {m.name: m for m in module_table("llama", cfg)}
    for name, p in model.state_dict().items():
        k = layout.tensor_kind(name)
        mod = name.rsplit(".", 1)[0]
        if mod in table and table[mod].kind == "linear" and name.endswith(".weight"):
            assert k == "target_linear_weight"
            assert layout.file_to_jax(name, p.numpy()).shape == (table[mod].d_in, table[mod].d_out)


# ----------------------------------------------------------------------------------------------
# Llama vs transformers


def test_llama_matches_transformers(llama_file, tmp_path, monkeypatch):
    weights, model = llama_file
    _check_llama_against_hf(weights, model, _ids(LLAMA_CFG["vocab_size"]), tmp_path, monkeypatch, "synthetic llama")


def test_llama_tied_embeddings(tmp_path, monkeypatch):
    """save_pretrained drops the tied lm_head; load_frozen restores it from the embedding."""
    model = _build_hf_llama(dict(LLAMA_CFG, tie_word_embeddings=True), seed=7)
    weights = _save_hf_llama(model, tmp_path / "tied.safetensors")
    assert "lm_head.weight" not in np_load_file(str(weights))
    kind, cfg, frozen = load_frozen(weights, jnp.float32)
    assert np.array_equal(np.asarray(frozen["lm_head.weight"]),
                          layout.file_to_jax("lm_head.weight", np_load_file(str(weights))["model.embed_tokens.weight"]))
    _check_llama_against_hf(weights, model, _ids(LLAMA_CFG["vocab_size"], (2, 9)), tmp_path, monkeypatch, "tied llama")


def test_llama_rope_theta_and_eps_come_from_config(llama_file, tmp_path):
    """Changing rope_theta / rms_norm_eps in the JSON changes the logits (nothing hard-coded)."""
    weights, _ = llama_file
    ids = _ids(LLAMA_CFG["vocab_size"], (2, 12))
    base = jax_forward_fp32(weights, ids)
    meta = json.loads(weights.with_suffix(".json").read_text())
    for key, mutate in (("theta", lambda c: c["rope_parameters"].update(rope_theta=50.0)),
                        ("eps", lambda c: c.update(rms_norm_eps=0.5))):
        m = json.loads(json.dumps(meta))
        mutate(m["config"])
        w2 = tmp_path / f"mut_{key}.safetensors"
        w2.write_bytes(weights.read_bytes())
        w2.with_suffix(".json").write_text(json.dumps(m))
        assert _max_abs(jax_forward_fp32(w2, ids), base) > 1e-3, key
    m = json.loads(json.dumps(meta))
    m["config"]["rope_parameters"] = {"rope_type": "linear", "rope_theta": 5000.0, "factor": 2.0}
    w3 = tmp_path / "mut_type.safetensors"
    w3.write_bytes(weights.read_bytes())
    w3.with_suffix(".json").write_text(json.dumps(m))
    with pytest.raises(NotImplementedError, match="rope_type"):
        jax_forward_fp32(w3, ids)


def test_load_frozen_layout_and_keys(llama_file):
    weights, _ = llama_file
    raw = np_load_file(str(weights))
    kind, cfg, frozen = load_frozen(weights, jnp.float32)
    assert kind == "llama"
    assert set(frozen) == set(raw)  # HF names kept
    k = "model.layers.0.self_attn.k_proj.weight"
    assert raw[k].shape == (16, 48) and frozen[k].shape == (48, 16)  # [out, in] → [in, out]
    assert np.array_equal(np.asarray(frozen[k]), raw[k].T)
    for m in module_table(kind, cfg):
        assert frozen[f"{m.name}.weight"].shape == (m.d_in, m.d_out), m.name
    assert frozen["model.embed_tokens.weight"].shape == (67, 48)


def test_load_frozen_refuses_float64_without_x64(llama_file):
    # in a fresh process with x64 off (x64 is process-global, and other modules turn it on)
    import subprocess
    import sys
    code = ("import sys, jax.numpy as jnp\nfrom jax_impl.targets import load_frozen\n"
            "try:\n    load_frozen(sys.argv[1], jnp.float64)\nexcept ValueError as e:\n    print('REFUSED', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"} | {"JAX_ENABLE_X64": "0"}
    p = subprocess.run([sys.executable, "-c", code, str(llama_file[0])], capture_output=True, text=True,
                       env=env, cwd=str(WEIGHTS_DIR.parents[1]), timeout=300)
    assert "REFUSED" in p.stdout and "jax_enable_x64" in p.stdout, p.stdout + p.stderr


# ----------------------------------------------------------------------------------------------
# site hook


def _site_case(kind, llama_file, toy_files):
    if kind == "llama":
        weights = llama_file[0]
        x = jnp.asarray(_ids(LLAMA_CFG["vocab_size"], (2, 7)), jnp.int32)
    else:
        weights, cfg, _ = toy_files[kind]
        x = jnp.asarray(_toy_inputs(kind, cfg), jnp.float32)
    return load_frozen(weights, jnp.float32), x


@pytest.mark.parametrize("kind", ["tms", "resid_mlp", "llama"])
def test_site_hook_called_once_per_module_in_order(kind, llama_file, toy_files):
    (kind_, cfg, frozen), x = _site_case(kind, llama_file, toy_files)
    table = module_table(kind_, cfg)
    infos = {m.name: m for m in table}
    calls = []

    def site(name, inp):
        calls.append(name)
        return frozen_site(frozen, infos[name], inp)

    y_hook = np.asarray(target_forward(kind_, cfg, frozen, x, site=site))
    y_default = np.asarray(target_forward(kind_, cfg, frozen, x))
    assert calls == [m.name for m in table]
    assert y_hook.tobytes() == y_default.tobytes()

    # the hook really is the only path: a site that zeroes one module changes the output
    victim = table[len(table) // 2].name

    def zero_site(name, inp):
        y = frozen_site(frozen, infos[name], inp)
        return y * 0 if name == victim else y

    assert not np.array_equal(np.asarray(target_forward(kind_, cfg, frozen, x, site=zero_site)), y_default)


# ----------------------------------------------------------------------------------------------
# toy targets vs numpy


@pytest.mark.parametrize("kind", ["tms", "resid_mlp"])
def test_toy_target_matches_numpy(kind, toy_files, tmp_path):
    weights, cfg, tensors = toy_files[kind]
    x = _toy_inputs(kind, cfg)
    ref = numpy_toy_forward(kind, cfg, tensors, x)
    d32 = _max_abs(jax_forward_fp32(weights, x.astype(np.float32)), ref)
    d64 = _max_abs(jax_forward_fp64(weights, x, tmp_path), ref)
    print(f"\n[{kind}] max abs diff JAX vs numpy: float32 {d32:.3e}  float64 {d64:.3e}")
    assert d32 <= TOL_FP32 and d64 <= TOL_FP64


# ----------------------------------------------------------------------------------------------
# shipped weights (contract/weights/*.safetensors)


def _shipped():
    return sorted(p for p in WEIGHTS_DIR.glob("*.safetensors") if p.with_suffix(".json").is_file())


@pytest.mark.parametrize("weights", _shipped() or [None], ids=lambda p: p.stem if p else "none")
def test_shipped_target(weights, tmp_path, monkeypatch):
    assert weights is not None, f"no shipped target weights in {WEIGHTS_DIR}"
    meta = load_target_meta(weights)
    kind, cfg = meta["kind"], meta["config"]
    if kind == "llama":
        _torch()
        ids = _ids(cfg["vocab_size"], (2, min(32, cfg.get("max_position_embeddings", 32))), seed=2)
        _check_llama_against_hf(weights, _hf_from_file(weights), ids, tmp_path, monkeypatch, weights.stem,
                                scale_tol=True)
    else:
        tensors = np_load_file(str(weights))
        x = _toy_inputs(kind, cfg, batch=8)
        ref = numpy_toy_forward(kind, cfg, tensors, x)
        d32 = _max_abs(jax_forward_fp32(weights, x.astype(np.float32)), ref)
        d64 = _max_abs(jax_forward_fp64(weights, x, tmp_path), ref)
        print(f"\n[{weights.stem}] max abs diff JAX vs numpy: float32 {d32:.3e}  float64 {d64:.3e}")
        assert d32 <= TOL_FP32 * max(1.0, float(np.max(np.abs(ref)))) and d64 <= TOL_FP64


def test_shipped_tiny_llama():
    p = WEIGHTS_DIR / "tiny_llama.safetensors"
    assert p.is_file(), f"{p} is not shipped"
    assert load_target_meta(p)["kind"] == "llama"
    assert p in _shipped()  # compared against transformers by test_shipped_target[tiny_llama]


# ----------------------------------------------------------------------------------------------
# the torch oracle's Llama (oracle_torch/targets.py) agrees with the JAX mirror


def test_oracle_llama_matches_jax(llama_file, tmp_path):
    torch = _torch()
    from oracle_torch.targets import load_target, target_forward as oracle_forward
    weights, _ = llama_file
    ids = _ids(LLAMA_CFG["vocab_size"])
    out = {}
    for dt in (torch.float32, torch.float64):
        with torch.no_grad():
            out[dt] = oracle_forward(load_target(weights, dt), "llama", torch.from_numpy(ids)).numpy()
    d32 = _max_abs(jax_forward_fp32(weights, ids), out[torch.float32])
    d64 = _max_abs(jax_forward_fp64(weights, ids, tmp_path), out[torch.float64])
    print(f"\n[oracle llama] max abs diff JAX vs oracle: float32 {d32:.3e}  float64 {d64:.3e}")
    assert d32 <= TOL_FP32 and d64 <= TOL_FP64


# ----------------------------------------------------------------------------------------------
# weight-file checks (S96): one framework-free check (contract.targets.check_weight_file) that
# both loaders run first, so a bad file gets the same one-line refusal from both backends


def _safetensors_bytes(entries: list[tuple[str, str, tuple[int, ...], bytes]]) -> bytes:
    """A safetensors file written by hand (any dtype name, e.g. BF16, which numpy cannot write)."""
    header, data = {}, b""
    for name, dtype, shape, raw in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + data


def _bad_weight_files(d: Path) -> dict[str, tuple[Path, list[str]]]:
    """case -> (a bad TMS weight file beside a good JSON, fragments its refusal must name)."""
    good = _toy_tensors("tms", TMS_CFG, 21)  # linear1.weight [3, 7], linear2.weight [7, 3], linear2.bias [7]
    nan = dict(good, **{"linear1.weight": good["linear1.weight"].copy()})
    nan["linear1.weight"][1, 4] = np.nan
    out: dict[str, tuple[dict | bytes, list[str]]] = {
        "missing": ({k: v for k, v in good.items() if k != "linear2.bias"}, ["missing tensor linear2.bias (7,)"]),
        "extra": (dict(good, **{"linear3.weight": np.zeros((3, 3), np.float32)}), ["unexpected tensor linear3.weight"]),
        "shape": (dict(good, **{"linear1.weight": good["linear1.weight"].T}),
                  ["tensor linear1.weight has shape (7, 3), expected (3, 7)"]),
        "int_dtype": (dict(good, **{"linear2.bias": np.arange(7, dtype=np.int32)}), ["tensor linear2.bias has dtype I32"]),
        "nan": (nan, ["tensor linear1.weight holds 1 non-finite value"]),
        "inf_f64": (dict(good, **{"linear2.bias": np.array([0, 1, np.inf, 0, 0, -np.inf, 0])}),
                    ["tensor linear2.bias holds 2 non-finite values"]),
        "bf16": (_safetensors_bytes([(k, "BF16" if k == "linear1.weight" else "F32", v.shape,
                                      (v.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
                                      if k == "linear1.weight" else v.tobytes()) for k, v in good.items()]),
                 ["tensor linear1.weight has dtype BF16"]),
        "empty": (b"", ["not a safetensors file"]),
        "garbage": (b"\x10" + b"\0" * 7 + b"this is no json header", ["its header is not JSON"]),
    }
    whole = _safetensors_bytes([(k, "F32", v.shape, v.tobytes()) for k, v in good.items()])
    out["truncated"] = (whole[:-5], ["tensor linear2.bias", "truncated"])  # the last tensor written
    out["header_cut"] = (whole[:30], ["not a safetensors file", "truncated"])
    out["trailing_bytes"] = (whole + b"\0" * 4, ["4 bytes after the last tensor (linear2.bias)"])
    files = {}
    for case, (content, fragments) in out.items():
        path = d / f"bad_{case}.safetensors"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            np_save_file({k: np.ascontiguousarray(v) for k, v in content.items()}, str(path))
        path.with_suffix(".json").write_text(json.dumps({"kind": "tms", "config": TMS_CFG, "training": {}}))
        files[case] = (path, fragments)
    return files


BAD_WEIGHT_CASES = ["missing", "extra", "shape", "int_dtype", "nan", "inf_f64", "bf16", "empty", "garbage",
                    "truncated", "header_cut", "trailing_bytes"]


@pytest.fixture(scope="module")
def bad_weight_files(tmp_path_factory):
    files = _bad_weight_files(tmp_path_factory.mktemp("bad_weights"))
    assert sorted(files) == sorted(BAD_WEIGHT_CASES)
    return files


@pytest.mark.parametrize("case", BAD_WEIGHT_CASES)
def test_load_frozen_refuses_bad_weight_file(bad_weight_files, case):
    # guards S96: a weight file that is incomplete, of other tensors, shapes or dtypes, or
    # holds NaN/inf is refused with one error (a ValueError) naming the file and the tensor
    from contract.targets import WeightFileError
    path, fragments = bad_weight_files[case]
    with pytest.raises(WeightFileError) as ei:
        load_frozen(path, jnp.float32)
    msg = str(ei.value)
    assert isinstance(ei.value, ValueError) and "\n" not in msg
    assert msg.startswith(f"target.weights: {path}: "), msg
    for f in fragments:
        assert f in msg, (f, msg)


@pytest.mark.parametrize("case", BAD_WEIGHT_CASES)
def test_bad_weight_file_refused_alike_by_both_backends(bad_weight_files, case):
    # guards S96: both loaders run the one contract check first: the same file gets the same
    # refusal, word for word, from the oracle and from JAX
    torch = _torch()
    from contract.targets import WeightFileError
    from oracle_torch.targets import load_target
    path, _ = bad_weight_files[case]
    with pytest.raises(WeightFileError) as jax_err:
        load_frozen(path, jnp.float32)
    with pytest.raises(WeightFileError) as torch_err:
        load_target(path, torch.float32)
    assert str(torch_err.value) == str(jax_err.value)


@pytest.mark.parametrize("case", ["nan", "truncated", "extra", "shape"])
def test_bad_weight_file_through_both_clis(bad_weight_files, case, tmp_path, capsys):
    # guards S96 at the command line: exit code 2, one line `PROG: error: ...` naming the file
    # and the tensor, the same message from vpd-oracle and vpd-train, never a traceback
    _torch()
    import yaml

    import jax_impl.cli
    import oracle_torch.cli
    from tests.helpers import tms_config

    path, fragments = bad_weight_files[case]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tms_config(str(path))))
    msgs = {}
    for prog, main in (("vpd-oracle", oracle_torch.cli.main), ("vpd-train", jax_impl.cli.main)):
        rc = main(["train", str(cfg), "--out", str(tmp_path / prog), "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err, (prog, rc, err)
        (line,) = err.splitlines()
        assert line.startswith(f"{prog}: error: target.weights: {path}: "), line
        msgs[prog] = line.split(": error: ", 1)[1]
        assert all(f in msgs[prog] for f in fragments), (fragments, line)
    assert msgs["vpd-oracle"] == msgs["vpd-train"]


def test_oracle_loads_a_tied_llama_file_like_jax(tmp_path):
    # guards S96: a tied Llama file without `lm_head.weight` (as save_pretrained writes it)
    # passes the shared check and loads in both backends, with the same logits
    torch = _torch()
    from oracle_torch.targets import load_target, target_forward as oracle_forward
    model = _build_hf_llama(dict(LLAMA_CFG, tie_word_embeddings=True), seed=7)
    weights = _save_hf_llama(model, tmp_path / "tied.safetensors")
    assert "lm_head.weight" not in np_load_file(str(weights))
    ids = _ids(LLAMA_CFG["vocab_size"], (2, 9))
    with torch.no_grad():
        ours = load_target(weights, torch.float32)
        assert torch.equal(ours.get_parameter("lm_head.weight"), ours.get_parameter("model.embed_tokens.weight"))
        y = oracle_forward(ours, "llama", torch.from_numpy(ids)).numpy()
    assert _max_abs(jax_forward_fp32(weights, ids), y) <= TOL_FP32


# ----------------------------------------------------------------------------------------------
# import boundaries of the two modules under test


def test_import_boundaries():
    code = (
        "import sys\n"
        "import contract.layout\n"
        "assert not {'torch', 'jax', 'transformers'} & set(sys.modules), sorted({'torch', 'jax', 'transformers'} & set(sys.modules))\n"
        "import jax_impl.targets\n"
        "assert not {'torch', 'transformers'} & set(sys.modules), sorted({'torch', 'transformers'} & set(sys.modules))\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
