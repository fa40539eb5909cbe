"""The shipped targets on the torch side (oracle_torch/targets.py, contract/weights/)."""
from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from contract.corpus import corpus_tokens
from contract.data import resid_mlp_batch, tms_batch, token_windows
from contract.targets import WEIGHTS_DIR, load_target_meta, module_table
from oracle_torch.targets import TMS, build_target, load_target, target_forward

torch.set_num_threads(1)

SHIPPED = ["tms_5-2", "tms_40-10", "resid_mlp1", "resid_mlp2", "tiny_llama"]
DTYPES = [torch.float32, torch.float64]


def _path(name):
    return WEIGHTS_DIR / f"{name}.safetensors"


def _input(kind, cfg, dtype, batch=8, seq=16):
    if kind == "tms":
        return torch.from_numpy(tms_batch(7, 0, batch, cfg)).to(dtype)
    if kind == "resid_mlp":
        return torch.from_numpy(resid_mlp_batch(7, 0, batch, cfg)).to(dtype)
    return torch.from_numpy(token_windows(corpus_tokens("heldout"), 7, 0, batch, seq))


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
def test_loads_and_runs(name, dtype):
    meta = load_target_meta(_path(name))
    kind, cfg = meta["kind"], meta["config"]
    assert set(meta["training"]) >= {"steps", "lr", "batch", "seed", "final_loss"}
    model = load_target(_path(name), dtype=dtype)
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert all(t.dtype == dtype for t in model.state_dict().values())
    x = _input(kind, cfg, dtype)
    with torch.no_grad():
        y = target_forward(model, kind, x)
    assert type(y) is torch.Tensor and y.dtype == dtype
    if kind == "llama":
        assert y.shape == (*x.shape, cfg["vocab_size"])
    else:
        assert y.shape == x.shape
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", SHIPPED)
def test_fp64_agrees_with_fp32(name):
    meta = load_target_meta(_path(name))
    x32 = _input(meta["kind"], meta["config"], torch.float32)
    x64 = _input(meta["kind"], meta["config"], torch.float64)
    with torch.no_grad():
        y32 = target_forward(load_target(_path(name), torch.float32), meta["kind"], x32)
        y64 = target_forward(load_target(_path(name), torch.float64), meta["kind"], x64)
    scale = y64.abs().max().item() + 1e-12
    assert (y32.double() - y64).abs().max().item() < 1e-4 * max(1.0, scale)


@pytest.mark.parametrize("name", SHIPPED)
def test_module_names_and_shapes_match_module_table(name):
    meta = load_target_meta(_path(name))
    model = load_target(_path(name))
    mods = dict(model.named_modules())
    order = list(mods)
    table = module_table(meta["kind"], meta["config"])
    assert table
    for info in table:
        assert info.name in mods, f"{name}: module {info.name} missing"
        m = mods[info.name]
        if info.kind == "linear":
            assert isinstance(m, nn.Linear), info
            assert (m.in_features, m.out_features) == (info.d_in, info.d_out), info
            assert tuple(m.weight.shape) == (info.d_out, info.d_in), info
            assert (m.bias is not None) == info.has_bias, info
        else:
            assert isinstance(m, nn.Embedding), info
            assert (m.num_embeddings, m.embedding_dim) == (info.d_in, info.d_out), info
    # module_table is in named_modules() order (site expansion relies on it)
    idx = [order.index(i.name) for i in table]
    assert idx == sorted(idx)


def test_tiny_llama_heldout_loss():
    meta = load_target_meta(_path("tiny_llama"))
    model = load_target(_path("tiny_llama"))
    ids = torch.from_numpy(token_windows(corpus_tokens("heldout"), 12345, 0, 64, 129))
    with torch.no_grad():
        logits = target_forward(model, "llama", ids[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()
    print(f"tiny_llama held-out loss {loss:.4f} nats (uniform {math.log(256):.4f})")
    assert loss < 0.6 * math.log(256)
    assert abs(loss - meta["training"]["heldout_loss_nats"]) < 1e-3  # same windows as pretraining
    assert meta["training"]["uniform_baseline_nats"] == pytest.approx(math.log(256))


def test_tiny_llama_config():
    from transformers import LlamaForCausalLM

    cfg = load_target_meta(_path("tiny_llama"))["config"]
    assert cfg["tie_word_embeddings"] is False
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # GQA
    assert cfg["rope_parameters"]["rope_theta"] == 10000.0
    model = load_target(_path("tiny_llama"))
    assert isinstance(model, LlamaForCausalLM)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("name", ["tms_5-2", "tms_40-10"])
def test_tms_reconstructs_sparse_inputs(name):
    meta = load_target_meta(_path(name))
    cfg = meta["config"]
    model = load_target(_path(name))
    assert isinstance(model, TMS)
    x = torch.from_numpy(tms_batch(999, 0, 4096, cfg)).float()
    with torch.no_grad():
        mse = ((target_forward(model, "tms", x) - x) ** 2).mean().item()
    zero = (x ** 2).mean().item()
    print(f"{name}: mse {mse:.5f} vs zero-output {zero:.5f}")
    assert mse < 0.3 * zero
    # weight file stores the tied pair explicitly
    assert torch.equal(model.linear2.weight, model.linear1.weight.T)


@pytest.mark.parametrize("name", ["resid_mlp1", "resid_mlp2"])
def test_resid_mlp_embedding_and_fit(name):
    meta = load_target_meta(_path(name))
    cfg = meta["config"]
    model = load_target(_path(name))
    W_E = model.get_buffer("W_E")
    assert tuple(W_E.shape) == (cfg["n_features"], cfg["d_embed"])
    assert torch.allclose(W_E.norm(dim=1), torch.ones(cfg["n_features"]), atol=1e-5)
    x = torch.from_numpy(resid_mlp_batch(999, 0, 4096, cfg)).float()
    with torch.no_grad():
        y = target_forward(model, "resid_mlp", x)
        resid_only = x @ W_E @ W_E.T
    label = x + torch.relu(x)
    mse, base = ((y - label) ** 2).mean().item(), ((resid_only - label) ** 2).mean().item()
    print(f"{name}: mse {mse:.6f} vs residual-only {base:.6f}")
    assert mse < 0.6 * base  # the MLPs compute a good part of relu(x)


def test_fp32_llama_is_stock_transformers_and_fp64_is_true_fp64():
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    meta = load_target_meta(_path("tiny_llama"))
    ids = _input("llama", meta["config"], None, batch=4, seq=48)
    ours = load_target(_path("tiny_llama"))
    cfg = LlamaConfig.from_dict(meta["config"])
    cfg._attn_implementation = "eager"
    stock = LlamaForCausalLM(cfg)
    stock.load_state_dict(load_file(str(_path("tiny_llama"))))
    stock.eval()
    with torch.no_grad():
        assert torch.equal(target_forward(ours, "llama", ids), stock(input_ids=ids, use_cache=False).logits)
    # fp64: the norms, RoPE tables and softmax run in float64 (stock transformers casts to fp32)
    ours64 = load_target(_path("tiny_llama"), torch.float64)
    assert isinstance(ours64, LlamaForCausalLM)
    norm = ours64.model.layers[0].input_layernorm
    assert isinstance(norm, LlamaRMSNorm)
    h = torch.randn(3, 5, cfg.hidden_size, dtype=torch.float64)
    ref = norm.weight * (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps))
    assert (norm(h) - ref).abs().max().item() < 1e-14
    pos = torch.arange(100)[None]
    cos, sin = ours64.model.rotary_emb(h, pos)
    hd = cfg.head_dim
    assert hd is not None  # LlamaConfig fills it in (hidden_size // num_attention_heads) when absent
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.cat([pos[0, :, None].double() * inv] * 2, dim=-1)
    assert cos.dtype == torch.float64
    assert (cos[0] - ang.cos()).abs().max().item() < 1e-13
    assert (sin[0] - ang.sin()).abs().max().item() < 1e-13


def test_load_does_not_touch_global_rng():
    torch.manual_seed(123)
    a = torch.rand(3)
    torch.manual_seed(123)
    load_target(_path("tiny_llama"))
    load_target(_path("resid_mlp1"))
    assert torch.equal(torch.rand(3), a)


def test_strict_loading_names_file_and_keys(tmp_path):
    src = _path("tms_5-2")
    tensors = load_file(str(src))
    shutil.copy(src.with_suffix(".json"), tmp_path / "t.json")
    bad = dict(tensors)
    bad.pop("linear2.bias")
    bad["extra.weight"] = torch.zeros(2)
    save_file(bad, str(tmp_path / "t.safetensors"))
    with pytest.raises(ValueError) as e:
        load_target(tmp_path / "t.safetensors")
    msg = str(e.value)
    assert "t.safetensors" in msg and "linear2.bias" in msg and "extra.weight" in msg
    wrong = dict(tensors)
    wrong["linear1.weight"] = torch.zeros(3, 5)
    save_file(wrong, str(tmp_path / "t.safetensors"))
    with pytest.raises(ValueError, match="linear1.weight"):
        load_target(tmp_path / "t.safetensors")
    (tmp_path / "t.json").unlink()
    with pytest.raises(FileNotFoundError, match="t.json"):
        load_target(tmp_path / "t.safetensors")


def test_load_target_refuses_bad_weight_files(tmp_path):
    # guards S96: the oracle runs the shared contract check (contract.targets.check_weight_file)
    # before loading: NaN/inf, a non-float or unsupported dtype, a truncated file and a file of
    # other tensors are each one WeightFileError (a ValueError) naming the file and the tensor
    from contract.targets import WeightFileError
    src = _path("tms_5-2")
    tensors = load_file(str(src))
    w = tensors["linear1.weight"]
    cases = {
        "nan": (dict(tensors, **{"linear1.weight": w.index_fill(1, torch.tensor([3]), float("nan"))}),
                "tensor linear1.weight holds 2 non-finite values"),
        "inf": (dict(tensors, **{"linear2.bias": torch.full((5,), float("inf"), dtype=torch.float64)}),
                "tensor linear2.bias holds 5 non-finite values"),
        "int": (dict(tensors, **{"linear2.bias": torch.zeros(5, dtype=torch.int64)}), "tensor linear2.bias has dtype I64"),
        "bf16": (dict(tensors, **{"linear1.weight": w.to(torch.bfloat16)}), "tensor linear1.weight has dtype BF16"),
        "extra": (dict(tensors, **{"extra.weight": torch.zeros(2)}), "unexpected tensor extra.weight"),
    }
    for case, (t, fragment) in cases.items():
        path = tmp_path / f"{case}.safetensors"
        save_file(t, str(path))
        shutil.copy(src.with_suffix(".json"), path.with_suffix(".json"))
        with pytest.raises(WeightFileError) as e:
            load_target(path)
        assert str(e.value).startswith(f"target.weights: {path}: ") and fragment in str(e.value), (case, str(e.value))
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(src.read_bytes()[:-3])
    shutil.copy(src.with_suffix(".json"), path.with_suffix(".json"))
    with pytest.raises(WeightFileError, match=r"truncated\.safetensors: tensor linear\S+: .*truncated file"):
        load_target(path)


def test_build_target_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        build_target("gpt", {})


def test_llama_rope_refusals_are_the_jax_ones():
    # S67/S93: only the default RoPE, its base read from the target's config; the oracle
    # refuses exactly like JAX (contract.targets.rope_theta) and never falls back to
    # transformers' default base
    cfg = {"vocab_size": 16, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 32}
    with pytest.raises(NotImplementedError, match="rope_type 'linear' is not implemented"):
        build_target("llama", dict(cfg, rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}))
    with pytest.raises(ValueError, match="no RoPE base"):
        build_target("llama", cfg)
    with torch.random.fork_rng(devices=[]):
        m = build_target("llama", dict(cfg, rope_theta=500.0))
    assert {r._vpd_base for r in m.modules() if hasattr(r, "_vpd_base")} == {500.0}


def test_llama_is_causal():
    model = load_target(_path("tiny_llama"), torch.float64)
    ids = _input("llama", None, None, batch=2, seq=40)
    ids2 = ids.clone()
    ids2[:, 25:] = (ids2[:, 25:] + 17) % 256
    with torch.no_grad():
        a, b = target_forward(model, "llama", ids), target_forward(model, "llama", ids2)
    assert torch.equal(a[:, :25], b[:, :25])
    assert not torch.allclose(a[:, 25:], b[:, 25:])
