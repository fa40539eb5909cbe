"""Data streams (contract/data.py): the batch at a step is a pure function of (seed, step)
(resumable, identical for every backend and process), data-parallel ranks cut the global
batch, sparse features have the configured density, and token streams are windows of the
user's file. SPEC S60-S62."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from contract.config import ConfigError, parse_config
from contract.data import (
    batch_for_step,
    load_tokens,
    rank_slice,
    resid_mlp_batch,
    sparse_features,
    tms_batch,
    token_windows,
)
from contract.resolve import resolve_run

REPO = Path(__file__).resolve().parents[1]
TMS = {"n_features": 5, "n_hidden": 2, "feature_probability": 0.05}
RESID = {"n_features": 40, "d_embed": 8, "d_mlp": 4, "n_layers": 1, "feature_probability": 0.1}
TOKENS = np.arange(500, dtype=np.int64) * 7 % 1000

# One snippet computes the digests in-process and in a fresh interpreter.
DIGEST_SNIPPET = """
import hashlib, numpy as np
from contract.data import tms_batch, resid_mlp_batch, token_windows
tms = {"n_features": 5, "n_hidden": 2, "feature_probability": 0.05}
resid = {"n_features": 40, "d_embed": 8, "d_mlp": 4, "n_layers": 1, "feature_probability": 0.1}
tokens = np.arange(500, dtype=np.int64) * 7 % 1000
def digests():
    arrs = [tms_batch(3, 17, 64, tms), resid_mlp_batch(3, 17, 64, resid), token_windows(tokens, 3, 17, 8, 16)]
    return [hashlib.sha256(a.tobytes()).hexdigest() + str(a.dtype) + str(a.shape) for a in arrs]
"""


def _digests() -> list[str]:
    ns: dict = {}
    exec(DIGEST_SNIPPET, ns)
    return ns["digests"]()


def test_same_seed_step_same_bytes():
    # guards S60: a batch is a pure function of (seed, step): same bytes on every call
    for f, cfg in ((tms_batch, TMS), (resid_mlp_batch, RESID)):
        a, b = f(1, 5, 32, cfg), f(1, 5, 32, cfg)
        assert a.tobytes() == b.tobytes() and a.dtype == b.dtype
    assert token_windows(TOKENS, 1, 5, 4, 9).tobytes() == token_windows(TOKENS, 1, 5, 4, 9).tobytes()


def test_same_bytes_in_fresh_process():
    # guards S60: no hidden process state (hash seeds, global RNG) enters the stream, so a
    # resumed run / another backend's process gets the same bytes
    here = _digests()
    code = DIGEST_SNIPPET + "\nimport json; print(json.dumps(digests()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == here


def test_different_steps_and_seeds_differ():
    # guards S60: every step (and seed) gets a fresh batch
    a = tms_batch(1, 5, 256, TMS)
    assert not np.array_equal(a, tms_batch(1, 6, 256, TMS))
    assert not np.array_equal(a, tms_batch(2, 5, 256, TMS))
    w = token_windows(TOKENS, 1, 5, 8, 16)
    assert not np.array_equal(w, token_windows(TOKENS, 1, 6, 8, 16))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_rank_slices_concatenate_to_global_batch(world):
    # guards S62: data-parallel ranks see disjoint consecutive slices of the GLOBAL batch
    g = resid_mlp_batch(0, 3, 8, RESID)
    pieces = [rank_slice(g, r, world) for r in range(world)]
    assert all(p.shape == (8 // world, 40) for p in pieces)
    assert np.array_equal(np.concatenate(pieces), g)
    t = token_windows(TOKENS, 0, 3, 8, 5)
    assert np.array_equal(np.concatenate([rank_slice(t, r, world) for r in range(world)]), t)


def test_rank_slice_non_divisible_batch_errors():
    # guards S62: a batch that does not split evenly is refused with a clear message
    with pytest.raises(ValueError, match=r"batch_size 6 is not divisible by .* world size 4"):
        rank_slice(np.zeros((6, 3)), 0, 4)


@pytest.mark.parametrize("low,p", [(0.0, 0.05), (0.0, 0.3), (-1.0, 0.01)])
def test_sparse_feature_density(low, p):
    # guards S64: each feature is nonzero with probability p, values U[low, 1]
    n = 400_000
    x = sparse_features(7, 0, n // 40, 40, p, low)
    on = x != 0
    frac = on.mean()
    assert abs(frac - p) < 5 * np.sqrt(p * (1 - p) / n) + 1e-4, frac
    v = x[on]
    assert v.min() >= low and v.max() <= 1.0
    assert abs(v.mean() - (low + 1) / 2) < 0.02
    # each feature column has the same density (no per-column bias)
    col = on.mean(0)
    assert np.all(np.abs(col - p) < 6 * np.sqrt(p * (1 - p) / (n // 40)) + 1e-4)


def test_feature_probability_comes_from_target_or_override():
    # guards: tms/resid batches use the target JSON's p unless data.feature_probability overrides it
    dflt = tms_batch(0, 0, 20_000, TMS)
    over = tms_batch(0, 0, 20_000, TMS, p=0.5)
    assert abs((dflt != 0).mean() - 0.05) < 0.01
    assert abs((over != 0).mean() - 0.5) < 0.02
    r = resid_mlp_batch(0, 0, 20_000, RESID)
    assert abs((r != 0).mean() - 0.1) < 0.01 and r.min() < 0


def _is_window(tokens: np.ndarray, rows: np.ndarray) -> bool:
    wins = np.lib.stride_tricks.sliding_window_view(tokens, rows.shape[1])
    return all((wins == r).all(1).any() for r in rows)


def _write_token_files(tmp_path: Path) -> tuple[np.ndarray, Path, Path]:
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 65536, size=3000).astype(np.int64)
    toks[:3] = [0, 255, 65535]  # uint16 extremes must survive (no sign wrap)
    npy = tmp_path / "tokens.npy"
    np.save(npy, toks.astype(np.int32).reshape(30, 100))  # any shape: flattened
    binf = tmp_path / "tokens.bin"
    toks.astype(np.uint16).tofile(binf)
    return toks, npy, binf


def test_token_files_load_exactly(tmp_path):
    # guards: a user .npy (any int dtype/shape) and a raw uint16 .bin load as the same int64 stream
    toks, npy, binf = _write_token_files(tmp_path)
    a = load_tokens("token_file", str(npy))
    b = load_tokens("token_file", str(binf))
    assert a.dtype == b.dtype == np.int64
    assert np.array_equal(a, toks) and np.array_equal(b, toks)


def test_token_windows_are_windows_of_the_file(tmp_path):
    # guards: each row of a token batch is a contiguous window of the user's file, via the
    # same path the backends use (batch_for_step on a llama config with data.token_file)
    toks, npy, binf = _write_token_files(tmp_path)
    for f in (npy, binf):
        cfg = parse_config({
            "target": {"kind": "llama", "weights": "unused.safetensors"},
            "data": {"source": "token_file", "token_file": str(f), "seq_len": 12},
            "sites": [{"pattern": "model.layers.*.mlp.up_proj", "C": 4}],
            "ci_fn": {"type": "shared_mlp"}, "output_loss": "kl",
            "loss_terms": [{"type": "faithfulness", "coeff": 1.0}],
            "optim": {"components": {"lr": {"start": 1e-3}}, "ci_fn": {"lr": {"start": 1e-3}}},
            "steps": 4, "batch_size": 6,
        })
        run = SimpleNamespace(cfg=cfg, target_meta={"kind": "llama", "config": {}})
        x = batch_for_step(run, cfg.seed, 2)
        assert x.shape == (6, 12) and x.dtype == np.int64
        assert _is_window(toks, x)
        assert np.array_equal(x, batch_for_step(run, cfg.seed, 2))
        assert not np.array_equal(x, batch_for_step(run, cfg.seed, 3))


def test_token_windows_short_stream_errors():
    # guards: a stream too short for one window is refused, not silently padded
    with pytest.raises(ValueError, match="fewer than seq_len"):
        token_windows(np.arange(8), 0, 0, 2, 8)


@pytest.mark.parametrize("name", ["missing.npy", "missing.bin"])
def test_missing_token_file_names_the_field(tmp_path, name):
    # guards: a missing user token file names the config field data.token_file
    with pytest.raises(FileNotFoundError, match=r"data\.token_file") as ei:
        load_tokens("token_file", str(tmp_path / name))
    assert name in str(ei.value)


def test_bad_token_file_names_the_field(tmp_path):
    # guards: a float .npy or a wrong suffix is refused naming data.token_file
    f = tmp_path / "floats.npy"
    np.save(f, np.zeros(100))
    with pytest.raises(ValueError, match=r"data\.token_file.*expected integer"):
        load_tokens("token_file", str(f))
    t = tmp_path / "tokens.txt"
    t.write_text("1 2 3")
    with pytest.raises(ValueError, match=r"data\.token_file.*\.npy or \.bin"):
        load_tokens("token_file", str(t))


def test_batch_for_step_eval_split_differs(tmp_path):
    # guards S61: the eval split is a different stream from training, deterministic too
    run = SimpleNamespace(
        cfg=parse_config({
            "target": {"kind": "tms", "weights": "unused.safetensors"},
            "sites": [{"pattern": "linear1", "C": 3}], "ci_fn": {"type": "mlp"}, "output_loss": "mse",
            "loss_terms": [{"type": "faithfulness", "coeff": 1.0}],
            "optim": {"components": {"lr": {"start": 1e-3}}, "ci_fn": {"lr": {"start": 1e-3}}},
            "steps": 4, "batch_size": 32,
        }),
        target_meta={"kind": "tms", "config": TMS})
    tr = batch_for_step(run, 0, 1)
    ev = batch_for_step(run, 0, 1, split="eval")
    assert tr.shape == ev.shape == (32, 5)
    assert np.array_equal(tr, tms_batch(0, 1, 32, TMS))
    assert not np.array_equal(tr, ev)
    assert np.array_equal(ev, batch_for_step(run, 0, 1, split="eval"))
    assert batch_for_step(run, 0, 1, batch=8).shape == (8, 5)


def _llama_token_run(token_file: Path):
    from contract.config_file import load_config
    from contract.targets import REPO_ROOT

    d = load_config(REPO_ROOT / "configs" / "tiny_llama.yaml").to_dict()
    d["data"] = {"source": "token_file", "token_file": str(token_file), "seq_len": 8}
    return resolve_run(parse_config(d))


def test_token_ids_outside_the_vocabulary_are_refused_at_resolve(tmp_path):
    # guards: torch raises on an out-of-range embedding index where JAX clamps it; the id is
    # refused before either backend sees it, with the file, the id, its position and the vocab
    toks = np.arange(100) % 256
    ok = tmp_path / "ok.npy"
    np.save(ok, toks)
    assert _llama_token_run(ok).cfg.data.token_file == str(ok)
    for bad_id, name in ((300, "high.npy"), (-1, "negative.npy")):
        t = toks.copy()
        t[37] = bad_id
        np.save(tmp_path / name, t)
        with pytest.raises(ConfigError) as e:
            _llama_token_run(tmp_path / name)
        msg = str(e.value)
        assert msg.startswith("data.token_file") and name in msg
        assert f"token id {bad_id} at position 37" in msg and "[0, 256)" in msg
    # the file is read in chunks: a bad id in a later chunk is found with its global position
    from contract.data import check_token_file
    t = toks.copy()
    t[93] = 999
    np.save(tmp_path / "late.npy", t)
    with pytest.raises(ValueError, match="token id 999 at position 93"):
        check_token_file(str(tmp_path / "late.npy"), 256, chunk=10)
    check_token_file(str(ok), 256, chunk=10)


def test_a_bin_token_file_with_an_odd_byte_count_is_refused(tmp_path):
    f = tmp_path / "odd.bin"
    f.write_bytes(np.arange(50, dtype=np.uint16).tobytes() + b"\x01")
    with pytest.raises(ConfigError) as e:
        _llama_token_run(f)
    assert "odd.bin" in str(e.value) and "101 bytes" in str(e.value)


def test_a_missing_token_file_is_named_when_the_data_is_read(tmp_path):
    # resolve leaves a missing file to the loader (a stored config can be re-resolved where
    # its data is absent, e.g. to read a checkpoint); reading a batch names the field and path
    run = _llama_token_run(tmp_path / "absent.npy")
    with pytest.raises(FileNotFoundError, match="data.token_file: file not found: .*absent.npy"):
        batch_for_step(run, 0, 0)
