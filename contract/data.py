"""Data streams. The batch at step k is a pure function of (seed, step): resumable in
O(1), identical for every backend; `rank_slice` cuts the global batch per data-parallel
rank (S60-S62). Arrays are numpy; backends convert."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from contract.targets import resolve_path

DATA_STREAM = 0x5EED_DA7A  # domain separator so data never shares a stream with draws


def _rng(seed: int, step: int, what: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, step, DATA_STREAM, what])))


def sparse_features(seed: int, step: int, batch: int, n_features: int, p: float, low: float) -> np.ndarray:
    """Each feature is U[low, 1] with probability p, else 0. -> float64 [batch, n_features]."""
    g = _rng(seed, step, 1)
    on = g.random((batch, n_features)) < p
    val = low + (1.0 - low) * g.random((batch, n_features))
    return np.where(on, val, 0.0)


def tms_batch(seed: int, step: int, batch: int, cfg: dict, p: float | None = None) -> np.ndarray:
    return sparse_features(seed, step, batch, cfg["n_features"], p or cfg["feature_probability"], 0.0)


def resid_mlp_batch(seed: int, step: int, batch: int, cfg: dict, p: float | None = None) -> np.ndarray:
    return sparse_features(seed, step, batch, cfg["n_features"], p or cfg["feature_probability"], -1.0)


def _mapped_token_file(path: Path) -> np.ndarray:
    """A user token file as a flat read-only memory map, its format checked (S63):
    `.npy` of integers, or raw uint16 `.bin` with an even, nonzero byte count."""
    where = f"data.token_file ({path})"
    if path.suffix == ".npy":
        arr = np.load(path, mmap_mode="r")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{where}: holds {arr.dtype}, expected integer token ids")
        return arr.reshape(-1)
    if path.suffix == ".bin":
        size = path.stat().st_size
        if size % 2 or size == 0:
            raise ValueError(f"{where}: has {size} bytes, not a whole, nonzero number of uint16 token ids")
        return np.memmap(path, dtype=np.uint16, mode="r")
    raise ValueError(f"{where}: must end in .npy or .bin")


@lru_cache(maxsize=4)
def load_tokens(source: str, token_file: str | None) -> np.ndarray:
    """All tokens of the stream as int64. 'corpus' = the project's generated corpus
    (training split); 'token_file' = a user file (.npy of ints or raw uint16 .bin)."""
    if source == "corpus":
        from contract.corpus import corpus_tokens
        return corpus_tokens("train")
    if token_file is None:
        raise ValueError(f"data.token_file is required to read tokens from data.source {source!r}")
    path = resolve_path(token_file)
    if not path.is_file():
        raise FileNotFoundError(f"data.token_file: file not found: {path}")
    return np.asarray(_mapped_token_file(path)).astype(np.int64)


def check_token_ids(tokens: np.ndarray, vocab_size: int, where: str, offset: int = 0) -> None:
    """Every id in [0, vocab_size): torch raises on an out-of-range embedding index where JAX
    clamps it, so a bad id would make the two backends train on different inputs (S63)."""
    bad = (tokens < 0) | (tokens >= vocab_size)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{where}: token id {int(tokens[i])} at position {offset + i} is outside the target's "
                         f"vocabulary [0, {vocab_size})")


def check_token_file(token_file: str, vocab_size: int, chunk: int = 1 << 24) -> None:
    """S63 at resolve time: the file's ids, read through its memory map in chunks (no copy of
    the stream). A missing file is left to the loader, which names it when the data is read."""
    path = resolve_path(token_file)
    if not path.is_file():
        return
    flat = _mapped_token_file(path)
    for i in range(0, flat.shape[0], chunk):
        check_token_ids(np.asarray(flat[i:i + chunk]), vocab_size, f"data.token_file ({path})", offset=i)


def token_windows(tokens: np.ndarray, seed: int, step: int, batch: int, seq_len: int) -> np.ndarray:
    """`batch` windows of `seq_len` tokens at offsets drawn from (seed, step)."""
    if len(tokens) <= seq_len:
        raise ValueError(f"token stream has {len(tokens)} tokens, fewer than seq_len+1={seq_len + 1}")
    starts = _rng(seed, step, 2).integers(0, len(tokens) - seq_len, size=batch)
    return np.stack([tokens[s:s + seq_len] for s in starts]).astype(np.int64)


def batch_for_step(run, seed: int, step: int, batch: int | None = None, split: str = "train") -> np.ndarray:
    """The global batch of a resolved run at `step` (`split='eval'` uses a disjoint stream)."""
    cfg, meta = run.cfg, run.target_meta["config"]
    B = batch or cfg.batch_size
    s = seed if split == "train" else seed + 1_000_003
    if cfg.target.kind == "tms":
        return tms_batch(s, step, B, meta, cfg.data.feature_probability)
    if cfg.target.kind == "resid_mlp":
        return resid_mlp_batch(s, step, B, meta, cfg.data.feature_probability)
    if split == "eval" and cfg.data.source == "corpus":
        from contract.corpus import corpus_tokens
        return token_windows(corpus_tokens("heldout"), s, step, B, cfg.data.seq_len)
    return token_windows(load_tokens(cfg.data.source, cfg.data.token_file), s, step, B, cfg.data.seq_len)


def rank_slice(global_batch: np.ndarray, rank: int, world: int) -> np.ndarray:
    B = global_batch.shape[0]
    if B % world:
        raise ValueError(f"batch_size {B} is not divisible by the data-parallel world size {world}")
    n = B // world
    return global_batch[rank * n:(rank + 1) * n]
