"""Seeded targets (contract/seeded_targets.py, S120): the same bytes from the same seed, a
valid weight file, made on first use only where the config points at them."""
from __future__ import annotations

import hashlib

from contract.seeded_targets import SEEDED, ensure_weights, make_seeded
from contract.targets import check_weight_file, load_target_meta, module_table


def _digest(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_seeded_llama_is_deterministic_and_valid(tmp_path):
    a = make_seeded("llama_scaled", tmp_path / "a")
    b = make_seeded("llama_scaled", tmp_path / "b")
    assert _digest(a) == _digest(b) and _digest(a.with_suffix(".json")) == _digest(b.with_suffix(".json"))
    meta = load_target_meta(a)
    assert meta["training"]["seeded_init"] is True and "NOT TRAINED" in meta["training"]["label"]
    check_weight_file(a, meta["kind"], meta["config"])  # the one check both backends run (S96)
    cfg = meta["config"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"]) == (256, 4, 2)
    assert cfg["num_attention_heads"] > cfg["num_key_value_heads"]  # grouped KV
    assert 2.5 < cfg["intermediate_size"] / cfg["hidden_size"] < 3.0
    assert len(module_table("llama", cfg)) == 2 + 7 * 4


def test_made_on_first_use_in_the_weights_dir_only(tmp_path, capsys):
    w = tmp_path / "llama_scaled.safetensors"
    assert ensure_weights(w, weights_dir=tmp_path) is True
    assert w.is_file() and w.with_suffix(".json").is_file()
    assert "llama_scaled" in capsys.readouterr().err  # says so on stderr
    assert ensure_weights(w, weights_dir=tmp_path) is False  # present: left alone
    other = tmp_path / "sub" / "llama_scaled.safetensors"  # outside the weights dir: not made
    assert ensure_weights(other, weights_dir=tmp_path) is False and not other.exists()
    unknown = tmp_path / "no_such_target.safetensors"
    assert ensure_weights(unknown, weights_dir=tmp_path) is False and not unknown.exists()
    assert set(SEEDED) == {"llama_scaled"}
