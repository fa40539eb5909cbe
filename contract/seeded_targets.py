"""Targets the project makes from a seed instead of shipping them (framework-free).

    python -m contract.seeded_targets [--only NAME] [--out DIR] [--force]

`llama_scaled` is a Llama of realistic proportions for a small CPU machine (hidden 256,
4 layers, intermediate 688 ≈ 2.7×, 4 query heads over 2 grouped KV heads of width 64, byte
vocabulary), used by `configs/llama_scaled.yaml` to measure throughput (S120). It is a
**seeded initialisation, not a trained model** (its JSON says so under `training`): every
weight matrix N(0, 1/fan_in) (the embedding N(0, 1)), every RMSNorm weight 1, drawn by
numpy's PCG64 from the spec's seed in the order of `expected_file_tensors`, so the file is
the same bytes on every machine. At 12 MB it is not committed (.gitignore): whoever needs it
first makes it — `load_target_meta` calls `ensure_weights` on a missing file under
`contract/weights/`, so both trainers, the benchmark and the tests make it on first use and
say so on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from contract.targets import WEIGHTS_DIR, expected_file_tensors

SEEDED: dict[str, dict] = {
    "llama_scaled": dict(
        kind="llama", seed=0,
        config=dict(vocab_size=256, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=64, intermediate_size=688, max_position_embeddings=512,
                    rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, rms_norm_eps=1e-6,
                    tie_word_embeddings=False, hidden_act="silu", attention_bias=False, mlp_bias=False,
                    model_type="llama", initializer_range=0.02),
    ),
}


def seeded_tensors(name: str) -> dict[str, np.ndarray]:
    """The float32 tensors of seeded target `name`, file (Hugging Face) layout."""
    spec = SEEDED[name]
    rng = np.random.default_rng(spec["seed"])
    out = {}
    for t, shape in expected_file_tensors(spec["kind"], spec["config"]).items():
        if len(shape) == 1:  # RMSNorm weights
            out[t] = np.ones(shape, np.float32)
        elif t == "model.embed_tokens.weight":  # [vocab, d]: unit-variance rows
            out[t] = rng.standard_normal(shape).astype(np.float32)
        else:  # [out, in]: unit-variance outputs for unit-variance inputs
            out[t] = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
    return out


def make_seeded(name: str, out_dir: str | Path = WEIGHTS_DIR) -> Path:
    """Write `<out_dir>/<name>.safetensors` and `<name>.json`; each file atomically (a
    concurrent maker writes the same bytes). Returns the weights path."""
    if name not in SEEDED:
        raise ValueError(f"unknown seeded target {name!r} (known: {', '.join(SEEDED)})")
    spec = SEEDED[name]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"kind": spec["kind"], "config": spec["config"],
            "training": {"seeded_init": True, "seed": spec["seed"], "steps": 0,
                         "label": "NOT TRAINED: a seeded initialisation for throughput measurements "
                                  "(contract/seeded_targets.py); weight matrices N(0, 1/fan_in), "
                                  "embedding N(0, 1), RMSNorm weights 1, numpy PCG64"}}
    w = out_dir / f"{name}.safetensors"
    pid = os.getpid()
    tmp_j, tmp_w = out_dir / f".{name}.json.{pid}.tmp", out_dir / f".{name}.safetensors.{pid}.tmp"
    tmp_j.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    save_file(seeded_tensors(name), str(tmp_w), metadata={"seeded_init": "true"})
    for t in (tmp_j, tmp_w):
        t.chmod(0o644)
    os.replace(tmp_j, w.with_suffix(".json"))  # the JSON first: a weight file is never without it
    os.replace(tmp_w, w)
    return w


def ensure_weights(path: Path, weights_dir: Path = WEIGHTS_DIR) -> bool:
    """Make a missing seeded target's files when `path` is `<weights_dir>/<name>.safetensors`
    of a known seeded target (saying so on stderr). True when it made them."""
    path = Path(path)
    if path.is_file() and path.with_suffix(".json").is_file():
        return False
    if path.parent.resolve() != Path(weights_dir).resolve() or path.suffix != ".safetensors" or path.stem not in SEEDED:
        return False
    print(f"{path.stem}: {path} is missing; making it (seeded initialisation, "
          f"`python -m contract.seeded_targets --only {path.stem}`) ...", file=sys.stderr, flush=True)
    make_seeded(path.stem, weights_dir)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m contract.seeded_targets", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--only", choices=sorted(SEEDED), action="append", help="make only this target (repeatable)")
    ap.add_argument("--out", default=str(WEIGHTS_DIR), help="output directory (default contract/weights)")
    ap.add_argument("--force", action="store_true", help="remake files that exist")
    args = ap.parse_args(argv)
    for name in args.only or sorted(SEEDED):
        w = Path(args.out) / f"{name}.safetensors"
        if w.is_file() and w.with_suffix(".json").is_file() and not args.force:
            print(f"{name}: {w} exists (--force remakes it)")
            continue
        print(f"{name}: wrote {make_seeded(name, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
