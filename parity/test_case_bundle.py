"""Case bundles (parity/case_bundle.py) on a tiny random Hugging Face Llama that is not the
shipped one: non-square everywhere (hidden 40, 2 heads of head_dim 12, 1 kv head,
intermediate 56, vocab 50), 2 layers, untied, rope theta 5000, float64.

- torch and JAX `terms` agree to 1e-10 relative on every key (S70 float64 budget);
- token ids and their embedding rows as `input.embeds` give the same terms (1e-12);
- a ci_lower pin of all ones makes ci_masked_recon equal unmasked_recon (S26) in both
  backends and leaves the terms that do not read ci_lower unchanged;
- malformed bundles are refused with errors that name the tensor or field.

Three JAX compiles (ids, embeds, pinned) dominate the runtime; results are cached per module."""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from contract.targets import REPO_ROOT, expected_file_tensors
from parity.case_bundle import (
    CaseBundleError,
    main,
    materialise,
    normalise_llama_config,
    read_case_bundle,
    terms,
    write_case_bundle,
)

# XLA backend optimisation level 0 for the three JAX compiles: same HLO, about half the
# compile time, results within ~2e-15 of the default setting (which the rest of parity/ uses).
FAST = True
# one xdist worker for the whole module (`pytest parity/ -n 2 --dist loadgroup`): the
# per-module result cache then compiles each JAX step once
pytestmark = pytest.mark.xdist_group("case_bundle")

REL = 1e-10  # parity/tolerances.py: ("float64", "term") and ("float64", "grad")

TCFG: dict[str, Any] = dict(model_type="llama", vocab_size=50, hidden_size=40, intermediate_size=56,
                            num_hidden_layers=2, num_attention_heads=2, head_dim=12, num_key_value_heads=1,
                            tie_word_embeddings=False, rope_theta=5000.0, rms_norm_eps=1e-5, max_position_embeddings=64)
SITES = [{"pattern": "model.layers.0.mlp.down_proj", "C": 4},
         {"pattern": "model.layers.1.self_attn.v_proj", "C": 3},
         {"pattern": "lm_head", "C": 5}]
TERMS = [{"type": "faithfulness", "coeff": 1.0},
         {"type": "importance_minimality", "coeff": 3.0e-3, "pnorm": 1.5, "beta": 0.5, "eps": 1.0e-6},
         {"type": "stochastic_recon_subset", "coeff": 0.5},
         {"type": "ci_masked_recon", "coeff": 0.3},
         {"type": "unmasked_recon", "coeff": 0.1}]
PIN_TERMS = [TERMS[1], TERMS[3], TERMS[4]]  # importance_minimality, ci_masked_recon, unmasked_recon
RUN = {"seed": 3, "data": {"source": "corpus"}, "sites": SITES, "ci_fn": {"type": "shared_mlp", "hidden": [6]},
       "output_loss": "kl", "loss_terms": TERMS, "steps": 10, "batch_size": 2,
       "optim": {"components": {"lr": {"start": 1.0e-3}}, "ci_fn": {"lr": {"start": 1.0e-3}}}}
B, T = 2, 5


def random_target(seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights with O(1) activations (a freshly initialised HF model is ~uniform)."""
    g = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_file_tensors("llama", normalise_llama_config(TCFG)).items():
        if "norm" in name:
            out[name] = 1.0 + 0.1 * g.standard_normal(shape)
        elif "embed" in name:
            out[name] = g.standard_normal(shape)
        else:
            out[name] = g.standard_normal(shape) / np.sqrt(shape[1])
    return out


TARGET = random_target()
IDS = np.random.default_rng(1).integers(0, TCFG["vocab_size"], (B, T))


def write(path, run=RUN, target=TARGET, check=True, **kw):
    kw = kw or {"input_ids": IDS}
    return write_case_bundle(path, target_kind="llama", target_config=TCFG, target=target, run_config=run,
                             precision="float64", check=check, **kw)


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def worst(a: dict, b: dict) -> tuple[float, str]:
    assert a.keys() == b.keys(), f"key sets differ: {sorted(a.keys() ^ b.keys())}"
    return max((rel(a[k], b[k]), k) for k in a)


_cache: dict = {}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    d = tmp_path_factory.mktemp("case_bundles")
    ids_path = write(d / "ids.safetensors")
    emb_path = write(d / "embeds.safetensors", input_embeds=TARGET["model.embed_tokens.weight"][IDS])
    ones = {f"ci_lower.{n}": np.ones((B, T, C)) for n, C in
            [("model.layers.0.mlp.down_proj", 4), ("model.layers.1.self_attn.v_proj", 3), ("lm_head", 5)]}
    # a smaller config (a cheaper JAX compile); same sites, CI function and seed, so the same init
    pin_path = write(d / "pinned.safetensors", run=dict(RUN, loss_terms=PIN_TERMS), input_ids=IDS, pins=ones)
    return {"ids": ids_path, "embeds": emb_path, "pinned": pin_path}


def result(bundles, name: str, backend: str) -> dict:
    if (name, backend) not in _cache:
        _cache[(name, backend)] = terms(bundles[name], backend, fast_compile=FAST)
    return _cache[(name, backend)]


def test_torch_and_jax_agree(bundles, record_property):
    t, j = result(bundles, "ids", "torch"), result(bundles, "ids", "jax")
    e, k = worst(t, j)
    record_property("margins", f"{'case_bundle tiny-random-llama jax-vs-torch':40s} terms+grad-norms {e:.1e}/{REL:.0e}")
    assert e <= REL, f"{k}: torch {t[k]!r} vs jax {j[k]!r} (rel {e:.2e} > {REL:g})"
    assert {f"loss/{i}.{tt['type']}" for i, tt in enumerate(TERMS)} | {"loss/total"} <= set(t)
    assert {"grad_norm/components", "grad_norm/ci_fn", "grad_norm/components.lm_head.V",
            "grad_norm/ci_fn.lm_head.w0"} <= set(t)
    assert all(np.isfinite(v) for v in t.values()) and t["loss/2.stochastic_recon_subset"] > 0


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_embeds_equal_ids(bundles, backend):
    a, b = result(bundles, "ids", backend), result(bundles, "embeds", backend)
    e, k = worst(a, b)
    assert e <= 1e-12, f"{backend} {k}: ids {a[k]!r} vs embeds {b[k]!r}"


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_pinned_ci_lower(bundles, backend):
    free, pinned = result(bundles, "ids", backend), result(bundles, "pinned", backend)
    # S26: with ci_lower = 1 the CI-masked forward is the unmasked one
    assert pinned["loss/1.ci_masked_recon"] == pytest.approx(pinned["loss/2.unmasked_recon"], rel=1e-13)
    assert rel(free["loss/3.ci_masked_recon"], free["loss/4.unmasked_recon"]) > 1e-3  # not so unpinned
    # the terms that never read ci_lower are unchanged (imp-min reads ci_upper, S13)
    assert pinned["loss/0.importance_minimality"] == pytest.approx(free["loss/1.importance_minimality"], rel=1e-13)
    assert pinned["loss/2.unmasked_recon"] == pytest.approx(free["loss/4.unmasked_recon"], rel=1e-13)
    if backend == "jax":
        e, k = worst(result(bundles, "pinned", "torch"), pinned)
        assert e <= REL, f"pinned bundle {k}: torch vs jax rel {e:.2e}"


def test_persistent_pgd_make_and_terms_both_backends(tmp_path, capsys):
    """`make` from a TMS config with three persistent-PGD terms (shared and per-position
    bundles), then `terms` (CLI) in both backends: the persistent sources (`init.sources.*`)
    reach the terms through the backend interface, and every term and gradient norm,
    including the sources' `grad_norm/sources.<bundle>.<site>`, agrees in float64."""
    import yaml

    from parity.cases import CASES
    from parity.tolerances import tol

    case = CASES["traj_tms_ppgd.64"]
    conf = tmp_path / "tms_ppgd.yaml"  # batch 64: every source reaches an active output (batch 16 is degenerate)
    conf.write_text(yaml.safe_dump(case.config_dict() | {"batch_size": 64, "steps": 10}))
    out = tmp_path / "tms_ppgd.safetensors"
    assert main(["make", "--config", str(conf), "--out", str(out)]) == 0
    b = read_case_bundle(out)
    assert b.init is not None
    run = case.run()
    persistent = [t for t in run.recon_terms if t.source == "persistent_pgd"]
    assert {f"sources.{t.bundle}.{s.name}" for t in persistent for s in run.sites} <= set(b.init)
    got = {}
    for backend in ("torch", "jax"):
        capsys.readouterr()
        assert main(["terms", "--case", str(out), "--backend", backend] + (["--fast-compile"] if FAST else [])) == 0
        got[backend] = json.loads(capsys.readouterr().out)
    t, j = got["torch"], got["jax"]
    assert t.keys() == j.keys(), sorted(t.keys() ^ j.keys())
    src = {f"grad_norm/sources.{tt.bundle}.{s.name}" for tt in persistent for s in run.sites}
    assert len({tt.bundle for tt in persistent}) == 3 and src <= set(t)
    assert all(t[k] > 0 for k in src), {k: t[k] for k in src}
    # the sources move the persistent terms away from the plain stochastic one
    assert all(rel(t[f"loss/{tt.index}.{tt.type}"], t["loss/2.stochastic_recon"]) > 1e-3 for tt in persistent)
    for k in t:
        tl = tol("float64", "term" if k.startswith("loss/") else "grad")
        e = abs(t[k] - j[k]) / max(abs(t[k]), abs(j[k]), tl.floor, 1e-300)
        assert e <= tl.rel, f"{k}: torch {t[k]!r} vs jax {j[k]!r} (rel {e:.2e} > {tl.rel:g})"


# ---------------------------------------------------------------- malformed bundles
def _raises(match: str, fn, *a, **kw):
    with pytest.raises(CaseBundleError, match=match) as ei:
        fn(*a, **kw)
    return str(ei.value)


def test_missing_target_tensor(tmp_path):
    tgt = {k: v for k, v in TARGET.items() if k != "model.norm.weight"}
    _raises(r"target\.model\.norm\.weight is missing", write, tmp_path / "a.safetensors", target=tgt)
    p = write(tmp_path / "a.safetensors", target=tgt, check=False)
    _raises(r"target\.model\.norm\.weight is missing", read_case_bundle, p)


def test_transposed_target_tensor(tmp_path):
    tgt = dict(TARGET, **{"model.layers.0.mlp.down_proj.weight": TARGET["model.layers.0.mlp.down_proj.weight"].T})
    _raises(r"target\.model\.layers\.0\.mlp\.down_proj\.weight has shape \(56, 40\), expected \(40, 56\)",
            write, tmp_path / "a.safetensors", target=tgt)


def test_bad_inputs(tmp_path):
    _raises(r"input\.ids has shape \(2, 5, 1\) \(rank 3\)", write, tmp_path / "a.safetensors", input_ids=IDS[..., None])
    _raises(r"both input\.ids and input\.embeds", write, tmp_path / "a.safetensors", input_ids=IDS,
            input_embeds=TARGET["model.embed_tokens.weight"][IDS])
    _raises(r"input\.embeds has shape \(2, 5, 39\)", write, tmp_path / "a.safetensors",
            input_embeds=np.zeros((B, T, 39)))
    _raises(r"input\.ids holds ids in \[50, 50\], outside \[0, 50\)", write, tmp_path / "a.safetensors", input_ids=np.full((B, T), 50))
    _raises(r"input\.x is not an input of a 'llama' target", write, tmp_path / "a.safetensors", input_x=np.zeros((B, 40)))


def test_bad_state_pins_draws(tmp_path):
    with materialise(write(tmp_path / "ok.safetensors")) as m:
        init, draws = m.init, m.draws
    site = "model.layers.1.self_attn.v_proj"
    part = {k: v for k, v in init.items() if k != f"components.{site}.U"}
    cases = [
        (dict(init=part), rf"init\.components\.{site}\.U is missing"),
        (dict(pins={"ci_lower.model.layers.1.mlp.up_proj": np.ones((B, T, 3))}), r"pin\.ci_lower\.model\.layers\.1\.mlp\.up_proj: .* is not a site"),
        (dict(pins={f"ci_upper.{site}": np.ones((B, T, 4))}), rf"pin\.ci_upper\.{site} has shape \(2, 5, 4\), expected \(2, 5, 3\)"),
        (dict(pins={"route.t3.e0.d0": np.ones((B, T, 3), bool)}), r"pin\.route\.t3\.e0\.d0: that forward is routed everywhere"),
        (dict(pins={"route.t2.e0.d0": np.ones((B, T, 2), bool)}), r"pin\.route\.t2\.e0\.d0 is bool \(2, 5, 2\), expected bool \(2, 5, 3\)"),
        (dict(draws={"t2.e0.d0.route_k": np.zeros((B, T + 1))}), r"draw\.t2\.e0\.d0\.route_k has shape \(2, 6\), expected \(2, 5\)"),
        (dict(draws={"t9.e0.d0.route_k": np.zeros((B, T))}), r"draw\.t9\.e0\.d0\.route_k is not in this run's draw plan"),
    ]
    assert "t2.e0.d0.route_k" in draws
    for i, (kw, match) in enumerate(cases):
        p = write(tmp_path / f"b{i}.safetensors", input_ids=IDS, **kw)
        with pytest.raises(CaseBundleError, match=match):
            with materialise(p):
                pass
    bad_run = dict(RUN, batch_size=3)
    p = write(tmp_path / "c.safetensors", check=False, input_ids=IDS)
    raw = read_case_bundle(p)
    raw.run_config = bad_run | {"data": {"source": "corpus", "seq_len": T}}
    with pytest.raises(CaseBundleError, match=r"run_config\.batch_size is 3 but input\.ids has 2 rows"):
        with materialise(raw):
            pass
    raw.run_config = dict(RUN, sites=[{"pattern": "model.layers.9.*", "C": 2}], data={"source": "corpus", "seq_len": T})
    with pytest.raises(CaseBundleError, match=r"sites\.0\.pattern: 'model\.layers\.9\.\*' matches no module"):
        with materialise(raw):
            pass


def test_embeds_refused_with_embedding_site(tmp_path):
    """The bundle check and both backends' target_forward refuse input embeddings when
    model.embed_tokens is a decomposed site."""
    import jax.numpy as jnp
    import torch

    run = dict(RUN, sites=[{"pattern": "model.embed_tokens", "C": 3}, {"pattern": "lm_head", "C": 2}],
               ci_fn={"type": "mlp", "hidden": [2]})
    emb = TARGET["model.embed_tokens.weight"][IDS]
    p = write(tmp_path / "e.safetensors", run=run, input_embeds=emb)
    with pytest.raises(CaseBundleError, match=r"input\.embeds with run_config\.sites matching model\.embed_tokens"):
        terms(p, "torch")
    with materialise(write(tmp_path / "i.safetensors", run=run, input_ids=IDS)) as m:
        from jax_impl.components import DecomposedModel as JaxModel
        from oracle_torch.components import DecomposedModel as TorchModel
        from oracle_torch.state import make_params

        tm = TorchModel(m.run, make_params(m.init, torch.float64), torch.float64)
        with pytest.raises(ValueError, match="cannot be a decomposed site"):
            tm.clean_forward(torch.as_tensor(emb))
        jm = JaxModel(m.run, jnp.float64)
        with pytest.raises(ValueError, match="cannot be a decomposed site"):
            jm.clean_forward(jm.frozen, jnp.asarray(emb))


def test_cli_make_and_terms(tmp_path, capsys):
    """`make` from a shipped config, then `terms` on it (torch; the TMS is cheap)."""
    out, conf = tmp_path / "tms.safetensors", str(REPO_ROOT / "configs" / "tms_5-2.yaml")
    assert main(["make", "--config", conf, "--out", str(out), "--batch-step", "2",
                 "--precision", "float64"]) == 0
    b = read_case_bundle(out)
    assert b.target_kind == "tms" and b.input_name == "x" and b.precision == "float64" and b.init is not None
    capsys.readouterr()
    assert main(["terms", "--case", str(out), "--backend", "torch"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert "loss/total" in got and "grad_norm/components" in got
    assert main(["make", "--config", conf, "--out", str(out), "--embeds"]) == 2
    assert "--embeds" in capsys.readouterr().err
