"""Config schema and resolution (contract/config.py, contract/resolve.py).

Guards SPEC S1 and the config-fidelity rule S93: a bad config is refused with ONE ConfigError
whose message names the field by its dotted path in the config (and the bad value), both
at parse time (pydantic) and at resolve time (cross-field rules both backends share);
every shipped config loads and resolves; config_diff names the changed fields. The strict
schema (S96): no NaN/inf, betas in [0, 1), no coercion to int/bool/float, no duplicate YAML
keys (tests/test_config_fuzz.py fuzzes the same rules through both CLIs).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from contract.config import ConfigError, config_diff, parse_config
from contract.config_file import load_config
from contract.resolve import resolve_run

REPO = Path(__file__).resolve().parents[1]
REQUIRED_CONFIGS = {"tms_5-2.yaml", "tms_40-10.yaml", "resid_mlp1.yaml", "tiny_llama.yaml"}


def write_tms_target(d: Path) -> str:
    """A tiny TMS 5-2 target in Hugging Face layout + its JSON (contract/targets.py)."""
    w = d / "tms_tiny.safetensors"
    save_file({
        "linear1.weight": np.zeros((2, 5), np.float32),
        "linear2.weight": np.zeros((5, 2), np.float32),
        "linear2.bias": np.zeros(5, np.float32),
    }, str(w))
    (d / "tms_tiny.json").write_text(json.dumps(
        {"kind": "tms", "config": {"n_features": 5, "n_hidden": 2, "feature_probability": 0.05}, "training": {}}))
    return str(w)


def base_config(weights: str = "unused.safetensors") -> dict:
    return {
        "seed": 0,
        "target": {"kind": "tms", "weights": weights},
        "sites": [{"pattern": "linear1", "C": 4}, {"pattern": "linear2", "C": 3}],
        "ci_fn": {"type": "mlp", "hidden": [8]},
        "output_loss": "mse",
        "loss_terms": [
            {"type": "faithfulness", "coeff": 1.0},
            {"type": "stochastic_recon", "coeff": 1.0},
            {"type": "importance_minimality", "coeff": 1e-3, "pnorm": 2.0},
        ],
        "optim": {"components": {"lr": {"start": 1e-3}}, "ci_fn": {"lr": {"start": 1e-3}}},
        "steps": 10,
        "batch_size": 8,
    }


def error_lines(e: ConfigError) -> list[str]:
    """The per-field lines of a ConfigError message (parse errors have a header line)."""
    lines = str(e).splitlines()
    return [ln.strip() for ln in (lines[1:] if lines[0].startswith("invalid config") else lines)]


# ------------------------------------------------------------------ parse-time errors
def _set(path: str, value):
    def f(d):
        *head, last = path.split(".")
        cur = d
        for p in head:
            cur = cur[int(p)] if isinstance(cur, list) else cur.setdefault(p, {})
        if isinstance(cur, list):
            cur[int(last)] = value
        else:
            cur[last] = value
    return f


PARSE_ERRORS = [
    # (id, mutation, field path the message must name, fragment of the problem)
    ("unknown_top", _set("bogus", 1), "bogus", "unknown field"),
    ("unknown_nested", _set("ci_fn.hiden", [3]), "ci_fn.hiden", "unknown field"),
    ("unknown_deep", _set("optim.components.lr.kindd", "linear"), "optim.components.lr.kindd", "unknown field"),
    ("wrong_type", _set("steps", "ten"), "steps", "'ten'"),
    ("negative_C", _set("sites.0.C", -3), "sites.0.C", "greater than 0"),
    # S96: a seed the JAX key cannot hold is refused for both backends (it was an OverflowError)
    ("huge_seed", _set("seed", 2**63 + 5), "seed", "less than"),
    ("zero_C", _set("sites.1.C", 0), "sites.1.C", "greater than 0"),
    ("unknown_loss_type", _set("loss_terms.1.type", "stochastic_recn"), "loss_terms.1", "stochastic_recn"),
    # a field error inside a loss term names the config path, not pydantic's union tag
    # (`loss_terms.1.stochastic_recon.bogus` would not be a path of the config)
    ("unknown_field_in_term", _set("loss_terms.1.bogus", 2), "loss_terms.1.bogus", "unknown field"),
    ("bad_type_in_term", _set("loss_terms.2.pnorm", "two"), "loss_terms.2.pnorm", "'two'"),
    ("bad_literal", _set("optim.ci_fn.lr.kind", "exp"), "optim.ci_fn.lr.kind", "'exp'"),
    ("bad_dtype", _set("runtime", {"dtype": "fp16"}), "runtime.dtype", "'fp16'"),
    ("bad_sampling", _set("sampling", "bernoulli"), "sampling", "'bernoulli'"),
    ("token_file_required", _set("data", {"source": "token_file"}), "data", "data.token_file is required"),
]


def assert_one_error_naming(d: dict, path: str, fragment: str) -> None:
    """S1: parsing `d` raises one ConfigError of exactly one line `path: problem (got value)`
    holding `fragment`."""
    with pytest.raises(ConfigError) as ei:
        parse_config(d)
    lines = error_lines(ei.value)
    assert len(lines) == 1, str(ei.value)
    assert lines[0].startswith(f"{path}: "), str(ei.value)
    assert fragment in lines[0], str(ei.value)


@pytest.mark.parametrize("mutate,path,fragment", [p[1:] for p in PARSE_ERRORS], ids=[p[0] for p in PARSE_ERRORS])
def test_parse_error_names_field_path(mutate, path, fragment):
    # guards S1: one mistake -> one ConfigError with exactly one line `path: problem (got value)`
    d = base_config()
    parse_config(copy.deepcopy(d))  # the base is valid, so the mutation alone is at fault
    mutate(d)
    assert_one_error_naming(d, path, fragment)


def test_load_config_names_file_and_field(tmp_path):
    # guards: errors from a YAML file name the file as well as the field path
    d = base_config()
    d["ci_fn"]["hiden"] = [3]
    import yaml
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match=r"(?s)bad\.yaml.*ci_fn\.hiden: unknown field"):
        load_config(p)


@pytest.mark.parametrize("text,fragment", [
    (None, "not found"),
    ("seed: [unclosed", "not valid YAML"),
    ("- just\n- a list\n", "mapping"),
])
def test_load_config_unreadable_file(tmp_path, text, fragment):
    # guards: a missing / non-YAML / non-mapping file is a ConfigError naming the file
    p = tmp_path / "c.yaml"
    if text is not None:
        p.write_text(text)
    with pytest.raises(ConfigError, match=fragment) as ei:
        load_config(p)
    assert "c.yaml" in str(ei.value)


# ------------------------------------------------------------------ resolve-time errors
def _term(**kw):
    def f(d):
        d["loss_terms"].append(kw)
    return f


RESOLVE_ERRORS = [
    ("chunk_larger_than_sites", _term(type="chunkwise_subset_recon", coeff=1.0, sites_per_chunk=3),
     "loss_terms.3.sites_per_chunk", "larger than the number of sites (2)"),
    ("persistent_pgd_coeff_0", _term(type="persistent_pgd_recon", coeff=0.0), "loss_terms.3.coeff", "coefficient 0"),
    ("persistent_pgd_nsc_without_n", _term(type="persistent_pgd_recon", coeff=1.0, scope="nsc"), "loss_terms.3.n_sources", "required"),
    ("persistent_pgd_n_without_nsc", _term(type="persistent_pgd_recon", coeff=1.0, scope="sc", n_sources=2), "loss_terms.3.n_sources", "only meaningful"),
    ("seq_len_on_tms", _set("data", {"seq_len": 16}), "data.seq_len", "no sequence axis"),
    ("corpus_on_tms", _set("data", {"source": "corpus"}), "data.source", "features"),
    ("component_mesh_not_dividing_C", _set("runtime", {"mesh": {"components": 3}}), "runtime.mesh.components",
     "site 'linear1' has C = 4, not divisible by runtime.mesh.components = 3"),
    ("mesh_not_dividing_batch", _set("runtime", {"mesh": {"data": 3}}), "batch_size", "not divisible"),
    ("pattern_matches_nothing", _set("sites.1.pattern", "lin*3"), "sites.1.pattern", "matches no module"),
    ("pattern_overlap", _set("sites.1.pattern", "linear*"), "sites.1.pattern", "already matched by sites.0"),
    ("kind_mismatch", _set("target.kind", "resid_mlp"), "target.kind", "holds a 'tms' target"),
    ("duplicate_faithfulness", _term(type="faithfulness", coeff=2.0), "loss_terms", "appears 2 times"),
]


@pytest.mark.parametrize("mutate,path,fragment", [p[1:] for p in RESOLVE_ERRORS], ids=[p[0] for p in RESOLVE_ERRORS])
def test_resolve_error_names_field_path(tmp_path, mutate, path, fragment):
    # guards S1 (refusals in resolve_run, which both backends call), S2 (patterns), S20
    # (terms at most once), S25 (chunk size), S85/S86 (adversary refusals):
    # one ConfigError naming the field
    d = base_config(write_tms_target(tmp_path))
    resolve_run(parse_config(copy.deepcopy(d)))  # the base resolves
    mutate(d)
    with pytest.raises(ConfigError) as ei:
        resolve_run(parse_config(d))
    lines = error_lines(ei.value)
    assert len(lines) == 1, str(ei.value)
    assert lines[0].startswith(f"{path}: "), str(ei.value)
    assert fragment in lines[0], str(ei.value)


def test_shared_source_bundle_refused(tmp_path):
    # guards S85: a source bundle belongs to exactly one persistent term
    d = base_config(write_tms_target(tmp_path))
    d["loss_terms"] += [{"type": "persistent_pgd_recon", "coeff": 1.0, "bundle": "shared"},
                        {"type": "persistent_pgd_recon_subset", "coeff": 1.0, "bundle": "shared"}]
    with pytest.raises(ConfigError) as ei:
        resolve_run(parse_config(d))
    assert error_lines(ei.value)[0].startswith("loss_terms.4.bundle: "), str(ei.value)
    assert "already belongs to loss_terms.3" in str(ei.value)


def test_chunk_size_equal_to_site_count_is_fine(tmp_path):
    # guards S25: the chunk check is `>` not `>=` (one chunk holding every site is legal)
    d = base_config(write_tms_target(tmp_path))
    d["loss_terms"].append({"type": "chunkwise_subset_recon", "coeff": 1.0, "sites_per_chunk": 2})
    run = resolve_run(parse_config(d))
    (t,) = [t for t in run.recon_terms if t.type == "chunkwise_subset_recon"]
    assert [e.live for e in t.entries] == [("linear1", "linear2")]


def test_resolve_site_order_and_shapes(tmp_path):
    # guards S2: sites in config-pattern order with the target's dims and per-pattern C
    d = base_config(write_tms_target(tmp_path))
    d["sites"] = [{"pattern": "linear2", "C": 3}, {"pattern": "linear1", "C": 4}]
    run = resolve_run(parse_config(d))
    assert run.site_names == ("linear2", "linear1")
    s2, s1 = run.sites
    assert (s2.d_in, s2.d_out, s2.has_bias, s2.C) == (2, 5, True, 3)
    assert (s1.d_in, s1.d_out, s1.has_bias, s1.C) == (5, 2, False, 4)
    assert run.batch_shape == (8,)


# ------------------------------------------------------------------ shipped configs
def shipped_configs() -> list[str]:
    return sorted({p.name for p in (REPO / "configs").glob("*.yaml")} | REQUIRED_CONFIGS)


def test_shipped_configs_exist():
    # guards: the glob below cannot pass vacuously; the four documented configs ship
    found = {p.name for p in (REPO / "configs").glob("*.yaml")}
    assert found, "configs/*.yaml is empty"
    assert REQUIRED_CONFIGS <= found, f"missing shipped configs: {sorted(REQUIRED_CONFIGS - found)}"


@pytest.mark.parametrize("name", shipped_configs())
def test_shipped_config_loads_and_resolves(name):
    # guards: every shipped config parses, resolves against its shipped weights, and
    # survives the checkpoint round trip (resolved dict -> parse -> same hash)
    cfg = load_config(REPO / "configs" / name)
    run = resolve_run(cfg)
    assert run.sites and run.site_names
    again = parse_config(cfg.to_dict())
    assert again == cfg and again.hash() == cfg.hash()


# ------------------------------------------------------------------ config_diff
def test_config_diff_reports_changed_fields():
    # guards: a resume with a different config is refused with a readable field diff
    a = parse_config(base_config()).to_dict()
    d = base_config()
    d["steps"] = 20
    d["ci_fn"]["hidden"] = [16, 16]
    d["optim"]["components"]["lr"]["kind"] = "cosine"
    d["loss_terms"][1]["coeff"] = 0.5
    b = parse_config(d).to_dict()
    diff = config_diff(a, b)
    joined = "\n".join(diff)
    assert "steps: 10 -> 20" in joined
    assert "ci_fn.hidden: [8] -> [16, 16]" in joined
    assert "optim.components.lr.kind: 'constant' -> 'cosine'" in joined
    assert "loss_terms.1.coeff: 1.0 -> 0.5" in joined
    assert len(diff) == 4, joined  # nothing unchanged is reported
    assert config_diff(a, copy.deepcopy(a)) == []


def test_config_diff_absent_keys_and_list_length():
    # guards: keys present on one side only, and lists of different length, are reported
    diff = config_diff({"x": 1, "l": [1, 2]}, {"y": 2, "l": [1, 2, 3]})
    assert "  x: 1 -> <absent>" in diff
    assert "  y: <absent> -> 2" in diff
    assert "  l: [1, 2] -> [1, 2, 3]" in diff


def test_recon_table_agrees_with_the_term_classes():
    # contract/ narrows a recon term's config by class where RECON_TERMS names its plan/source
    # (draws, init, resolve, schedules): source 'fresh_pgd' <=> FreshPGDTerm, 'persistent_pgd'
    # <=> PersistentPGDTerm, plan 'chunks' <=> ChunkwiseSubsetRecon, any other <=> PlainReconTerm
    import typing

    from contract.config import (
        RECON_TERMS,
        ChunkwiseSubsetRecon,
        FreshPGDTerm,
        LossTerm,
        PersistentPGDTerm,
        PlainReconTerm,
    )

    classes = {typing.get_args(c.model_fields["type"].annotation)[0]: c for c in typing.get_args(typing.get_args(LossTerm)[0])}
    assert set(RECON_TERMS) <= set(classes)
    for ty, (plan, source) in RECON_TERMS.items():
        c = classes[ty]
        assert issubclass(c, FreshPGDTerm) == (source == "fresh_pgd"), ty
        assert issubclass(c, PersistentPGDTerm) == (source == "persistent_pgd"), ty
        assert issubclass(c, ChunkwiseSubsetRecon) == (plan == "chunks"), ty
        assert issubclass(c, PlainReconTerm) == (source not in ("fresh_pgd", "persistent_pgd")), ty
    assert not any(issubclass(c, (PlainReconTerm, FreshPGDTerm, PersistentPGDTerm))
                   for ty, c in classes.items() if ty not in RECON_TERMS)


# ------------------------------------------------------------------ strict schema (S96)
STRICT_ERRORS = [
    # (id, mutation, field path the message must name, fragment of the problem)
    ("lr_inf", _set("optim.components.lr.start", float("inf")), "optim.components.lr.start", "finite"),
    ("lr_minus_inf", _set("optim.ci_fn.lr.start", float("-inf")), "optim.ci_fn.lr.start", "finite"),
    ("coeff_nan", _set("loss_terms.1.coeff", float("nan")), "loss_terms.1.coeff", "finite"),
    ("coeff_inf", _set("loss_terms.0.coeff", float("inf")), "loss_terms.0.coeff", "finite"),
    ("eps_inf", _set("optim.components.eps", float("inf")), "optim.components.eps", "finite"),
    ("clip_inf", _set("optim.ci_fn.clip", float("inf")), "optim.ci_fn.clip", "finite"),
    ("imp_min_eps_inf", _set("loss_terms.2.eps", float("inf")), "loss_terms.2.eps", "finite"),
    ("warmup_lr_nan", _set("faithfulness_warmup.lr", float("nan")), "faithfulness_warmup.lr", "finite"),
    ("beta1_is_1", _set("optim.components.betas", [1.0, 0.999]), "optim.components.betas.0", "less than 1"),
    ("beta2_above_1", _set("optim.ci_fn.betas", [0.9, 1.5]), "optim.ci_fn.betas.1", "less than 1"),
    ("beta_negative", _set("optim.components.betas", [-0.1, 0.999]), "optim.components.betas.0", "greater than or equal to 0"),
    ("beta_nan", _set("optim.components.betas", [0.9, float("nan")]), "optim.components.betas.1", "finite"),
    ("beta_bool", _set("optim.components.betas", [True, 0.999]), "optim.components.betas.0", "valid number"),
    ("betas_three", _set("optim.components.betas", [0.9, 0.99, 0.999]), "optim.components.betas", "at most 2"),
    ("source_beta_is_1", _set("loss_terms.3", {"type": "persistent_pgd_recon", "coeff": 1.0,
                                               "optimizer": {"betas": [0.9, 1.0]}}),
     "loss_terms.3.optimizer.betas.1", "less than 1"),
    ("steps_true", _set("steps", True), "steps", "valid integer (got True)"),
    ("C_true", _set("sites.0.C", True), "sites.0.C", "valid integer (got True)"),
    ("steps_float", _set("steps", 10.0), "steps", "valid integer (got 10.0)"),
    ("steps_string", _set("steps", "10"), "steps", "valid integer (got '10')"),
    ("hidden_bool", _set("ci_fn.hidden", [True]), "ci_fn.hidden.0", "valid integer"),
    ("seed_false", _set("seed", False), "seed", "valid integer (got False)"),
    ("bool_from_int", _set("use_delta_component", 1), "use_delta_component", "valid boolean (got 1)"),
    ("bool_from_string", _set("use_delta_component", "yes"), "use_delta_component", "valid boolean (got 'yes')"),
    ("float_from_bool", _set("loss_terms.0.coeff", True), "loss_terms.0.coeff", "valid number (got True)"),
    ("float_from_string", _set("optim.components.lr.start", "1e-3"), "optim.components.lr.start", "valid number"),
]


@pytest.mark.parametrize("mutate,path,fragment", [p[1:] for p in STRICT_ERRORS], ids=[p[0] for p in STRICT_ERRORS])
def test_strict_schema_refuses(mutate, path, fragment):
    # guards S96 (and S1's one-error-naming-the-field form): no NaN/inf, betas in [0, 1),
    # no bool/float/str taken as an int, no int/str as a bool, no bool/str as a float
    d = base_config()
    if path.startswith("loss_terms.3"):
        d["loss_terms"].append({})
    else:
        parse_config(copy.deepcopy(d))  # the base is valid, so the mutation alone is at fault
    mutate(d)
    assert_one_error_naming(d, path, fragment)


def test_strict_schema_keeps_what_is_meant():
    # guards S96: strictness refuses coercions, not values: an int is a float (`lr: 1`), the
    # betas are a YAML/JSON list or a tuple (0 is a valid beta), and the resolved dict of a
    # config parses back to the same config (the checkpoint round trip, S94)
    d = base_config()
    d["optim"]["components"]["lr"]["start"] = 1
    d["optim"]["components"]["betas"] = [0.0, 0.5]
    d["optim"]["ci_fn"]["betas"] = (0.8, 0.9)
    d["loss_terms"][0]["coeff"] = 2
    cfg = parse_config(d)
    assert cfg.optim.components.lr.start == 1.0 and isinstance(cfg.optim.components.lr.start, float)
    assert cfg.loss_terms[0].coeff == 2.0 and isinstance(cfg.loss_terms[0].coeff, float)
    assert cfg.optim.components.betas == (0.0, 0.5) and cfg.optim.ci_fn.betas == (0.8, 0.9)
    assert parse_config(cfg.to_dict()) == cfg


def _yaml_file(tmp_path, text: str, name: str = "c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_yaml_non_finite_and_exponent_floats(tmp_path):
    # guards S96: YAML's `.inf` / `.nan` reach the schema as floats and are refused with the
    # path; a number with an exponent is a float with or without a dot (`1e-3`, YAML 1.2),
    # so strict float fields take it (PyYAML alone reads `1e-3` as a string)
    import yaml
    text = yaml.safe_dump(base_config())
    assert "start: 0.001" in text
    for bad, got in ((".inf", "inf"), ("-.inf", "-inf"), (".nan", "nan")):
        with pytest.raises(ConfigError) as ei:  # the first `start` of the dump is optim.ci_fn's
            load_config(_yaml_file(tmp_path, text.replace("start: 0.001", f"start: {bad}", 1)))
        assert error_lines(ei.value) == [f"optim.ci_fn.lr.start: Input should be a finite number (got {got})"], str(ei.value)
    for spelled, value in (("1e-3", 1e-3), ("2E-3", 2e-3), ("1.0e3", 1e3), ("5e+1", 50.0), ("+1.5e-2", 0.015), (".5e-1", 0.05)):
        cfg = load_config(_yaml_file(tmp_path, text.replace("start: 0.001", f"start: {spelled}")))
        assert cfg.optim.components.lr.start == value and cfg.optim.ci_fn.lr.start == value, spelled
    assert load_config(_yaml_file(tmp_path, text)).steps == 10  # ints stay ints


@pytest.mark.parametrize("text,key,lines", [
    ("seed: 0\nsteps: 10\nsteps: 20\n", "steps", (2, 3)),
    ("optim:\n  components: {lr: {start: 0.1, start: 0.2}}\n", "optim.components.lr.start", (2, 2)),
    ("sites:\n- pattern: linear1\n  C: 4\n  C: 5\n", "sites.0.C", (3, 4)),
    ("ci_fn:\n  type: mlp\n  hidden: [8]\nci_fn: {type: mlp}\n", "ci_fn", (1, 4)),
])
def test_yaml_duplicate_key_refused(tmp_path, text, key, lines):
    # guards S96: a key given twice in one mapping is refused (plain YAML keeps the last one
    # silently); the one error names the file, the key's config path and both lines
    with pytest.raises(ConfigError) as ei:
        load_config(_yaml_file(tmp_path, text, "dup.yaml"))
    msg = str(ei.value)
    assert "dup.yaml" in msg
    (line,) = error_lines(ei.value)
    assert line.startswith(f"{key}: duplicate key {key.split('.')[-1]!r} (lines {lines[0]} and {lines[1]})"), msg


def test_yaml_merge_keys_and_repeats_across_mappings_are_fine(tmp_path):
    # guards S96 (no false alarm): the same key in two different mappings, and a merge key
    # (`<<: *anchor`) overridden by the mapping it merges into, are not duplicates
    import yaml
    d = base_config()
    d.pop("optim")
    text = yaml.safe_dump(d) + (
        "optim:\n"
        "  components: {lr: &lr {start: 0.001, kind: cosine}}\n"
        "  ci_fn: {lr: {<<: *lr, start: 0.002}}\n")
    cfg = load_config(_yaml_file(tmp_path, text))
    assert cfg.optim.components.lr.start == 0.001 and cfg.optim.ci_fn.lr.start == 0.002
    assert cfg.optim.ci_fn.lr.kind == "cosine"


def test_config_file_not_text(tmp_path):
    # guards S1: a binary config file is one ConfigError naming the file, not a traceback
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match="bin.yaml"):
        load_config(p)
