"""TMS recovery check: did the decomposition find one component per feature per site?

Feed each feature alone at value 1.0 (one-hot inputs), read ci_lower per site per
component, and score the matching. The scoring is backend-agnostic: it takes a function
`ci_of_inputs(x: np.ndarray [n_inputs, n_features]) -> {site: np.ndarray [n_inputs, C]}`;
`ci_function` builds one from a checkpoint through the backend interface
(`make_backend`, `Backend.load_checkpoint`, `Backend.ci_lower`) of either backend.

Score per site (threshold 0.1 on ci_lower):
- a feature is *matched* when exactly one component has ci > threshold for it and that
  component is above threshold for no other feature;
- `matched` = fraction of matched features; `alive` = components above threshold for
  some feature. Recovery = every site matched 1.0 with alive == n_features.

    python -m parity.tms_recovery [--backend torch|jax] --checkpoint RUN/checkpoints/step_X --out ci.png

(`--backend` defaults to the backend that wrote the checkpoint, from its meta.json.)
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from contract.resolve import ResolvedRun

THRESHOLD = 0.1

CIFunction = Callable[[np.ndarray], dict]


# ---------------------------------------------------------------- scoring (backend-agnostic)
def one_hot_inputs(n_features: int, value: float = 1.0) -> np.ndarray:
    return np.eye(n_features) * value


def site_score(ci: np.ndarray, threshold: float = THRESHOLD) -> dict:
    """ci [n_features, C] of one site -> matching score."""
    active = ci > threshold
    n_feat_per_comp = active.sum(0)  # [C]
    per_feature = []
    for f in range(ci.shape[0]):
        comps = np.flatnonzero(active[f])
        ok = len(comps) == 1 and n_feat_per_comp[comps[0]] == 1
        per_feature.append({"feature": f, "components": comps.tolist(), "matched": bool(ok)})
    n_matched = sum(p["matched"] for p in per_feature)
    return {"n_features": ci.shape[0], "n_matched": n_matched, "matched": n_matched / ci.shape[0],
            "alive": int((n_feat_per_comp > 0).sum()), "C": ci.shape[1], "per_feature": per_feature}


def recovery_scores(ci_of_inputs: CIFunction, n_features: int, threshold: float = THRESHOLD) -> dict:
    ci = {k: np.asarray(v) for k, v in ci_of_inputs(one_hot_inputs(n_features)).items()}
    sites = {k: site_score(v, threshold) for k, v in ci.items()}
    recovered = all(s["matched"] == 1.0 and s["alive"] == n_features for s in sites.values())
    return {"threshold": threshold, "sites": sites, "alive_total": sum(s["alive"] for s in sites.values()),
            "matched_mean": float(np.mean([s["matched"] for s in sites.values()])), "recovered": recovered,
            "ci": {k: v.tolist() for k, v in ci.items()}}


def format_table(scores: dict) -> str:
    lines = [f"{'site':<24} {'matched':>9} {'alive':>6} {'C':>5}  components per feature (ci > {scores['threshold']})"]
    for name, s in scores["sites"].items():
        comps = " ".join("[" + ",".join(map(str, p["components"])) + "]" + ("" if p["matched"] else "!")
                         for p in s["per_feature"])
        lines.append(f"{name:<24} {s['n_matched']:>4}/{s['n_features']:<4} {s['alive']:>6} {s['C']:>5}  {comps}")
    lines.append(f"alive components overall: {scores['alive_total']}; mean matched fraction "
                 f"{scores['matched_mean']:.3f}; recovered: {'YES' if scores['recovered'] else 'NO'}")
    return "\n".join(lines)


def sorted_alive(ci: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """Indices of components alive for some feature, sorted by the feature where each is
    strongest (then by strength, descending)."""
    alive = np.flatnonzero((ci > threshold).any(0))
    return np.array(sorted(alive, key=lambda c: (int(ci[:, c].argmax()), -float(ci[:, c].max()))), dtype=int)


def plot_heatmap(ci: dict, path: str | Path, threshold: float = THRESHOLD, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(ci)
    fig, axes = plt.subplots(1, len(names), figsize=(max(4.0, 3.2 * len(names)), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        a = np.asarray(ci[name])
        cols = sorted_alive(a, threshold)
        data = a[:, cols] if len(cols) else np.zeros((a.shape[0], 1))
        im = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_title(f"{name} ({len(cols)} alive of {a.shape[1]})", fontsize=9)
        ax.set_ylabel("feature (one-hot input)")
        ax.set_xlabel("component")
        ax.set_yticks(range(a.shape[0]))
        if len(cols) <= 40:
            ax.set_xticks(range(len(cols)), [str(c) for c in cols], fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- backends
BACKEND_NAMES = ("torch", "jax")


def run_of_checkpoint(checkpoint: str | Path):
    """(run, meta) of a checkpoint dir: the run rebuilt from the config stored in its meta.json."""
    from contract.checkpoint_meta import read_meta
    from contract.config import parse_config
    from contract.resolve import resolve_run

    meta = read_meta(checkpoint)
    return resolve_run(parse_config(meta["config"], f"{checkpoint}/meta.json")), meta


def ci_function(checkpoint: str | Path, backend: str | None = None) -> tuple[ResolvedRun, CIFunction, str]:
    """-> (run, ci_of_inputs, backend name) of a checkpoint dir, through the backend interface;
    `backend` None = the one that wrote the checkpoint."""
    from loop.backends import make_backend

    run, meta = run_of_checkpoint(checkpoint)
    # the oracle's checkpoints say "torch_oracle", the JAX trainer's "jax"
    name = backend or ("torch" if str(meta.get("backend", "torch")).startswith("torch") else meta["backend"])
    if name == "jax" and run.cfg.runtime.dtype == "float64":
        import jax
        jax.config.update("jax_enable_x64", True)  # before any JAX array is made
    b = make_backend(name, run)
    state, _ = b.load_checkpoint(Path(checkpoint))

    def ci_of_inputs(x: np.ndarray) -> dict:
        return {k: np.asarray(v, np.float64) for k, v in b.ci_lower(state, x).items()}

    return run, ci_of_inputs, name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity.tms_recovery", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--backend", choices=BACKEND_NAMES,
                    help="backend to load the checkpoint with (default: the one that wrote it)")
    ap.add_argument("--checkpoint", required=True, help="checkpoint dir (RUN/checkpoints/step_X) or a run dir")
    ap.add_argument("--out", required=True, help="PNG heat map path")
    ap.add_argument("--threshold", type=float, default=THRESHOLD)
    ap.add_argument("--json", help="also write the scores as JSON here")
    args = ap.parse_args(argv)
    ck = Path(args.checkpoint)
    if not (ck / "meta.json").is_file() and (ck / "checkpoints").is_dir():
        from contract.checkpoint_digest import verify_checkpoint
        from contract.errors import CheckpointError
        # the newest checkpoint whose digest verifies (S107); damaged ones are named and skipped
        for step_dir in sorted((p for p in (ck / "checkpoints").iterdir() if p.name.startswith("step_")), reverse=True):
            try:
                verify_checkpoint(step_dir, legacy_files=())
            except CheckpointError as e:
                print(f"tms_recovery: warning: {e}; trying an older one", file=sys.stderr)
                continue
            ck = step_dir
            break
    if not (ck / "meta.json").is_file():
        print(f"tms_recovery: error: {args.checkpoint} is not a checkpoint directory (no meta.json)", file=sys.stderr)
        return 2
    from contract.config import ConfigError
    from contract.errors import VPDError

    try:
        run, _ = run_of_checkpoint(ck)
        if run.cfg.target.kind != "tms":
            print(f"tms_recovery: error: {ck} decomposes a {run.cfg.target.kind!r} target, not tms", file=sys.stderr)
            return 2
        run, ci_of_inputs, backend = ci_function(ck, args.backend)
    except (ConfigError, VPDError, FileNotFoundError, ValueError) as e:  # e.g. a JAX checkpoint read with --backend torch
        print(f"tms_recovery: error: {e}", file=sys.stderr)
        return 2
    n_features = run.target_meta["config"]["n_features"]
    scores = recovery_scores(ci_of_inputs, n_features, args.threshold)
    print(format_table(scores))
    png = plot_heatmap({k: np.asarray(v) for k, v in scores["ci"].items()}, args.out, args.threshold,
                       title=f"{ck} ({backend})")
    print(f"heat map: {png}")
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in scores.items()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
