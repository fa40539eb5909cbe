"""TMS recovery check: did the decomposition find one component per feature per site?

Feed each feature alone at value 1.0 (one-hot inputs), read ci_lower per site per
component, and score the matching. The scoring is backend-agnostic: it takes a function
`ci_of_inputs(x: np.ndarray [n_inputs, n_features]) -> {site: np.ndarray [n_inputs, C]}`;
backends register a factory `checkpoint dir -> (run, ci_of_inputs)` in `BACKENDS`
(torch here; the JAX trainer adds its own).

Score per site (threshold 0.1 on ci_lower):
- a feature is *matched* when exactly one component has ci > threshold for it and that
  component is above threshold for no other feature;
- `matched` = fraction of matched features; `alive` = components above threshold for
  some feature. Recovery = every site matched 1.0 with alive == n_features.

    python -m parity.tms_recovery --backend torch --checkpoint RUN/checkpoints/step_X --out ci.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np

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
    for ax, name in zip(axes[0], names):
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
def run_of_checkpoint(checkpoint: str | Path):
    from contract.config import parse_config
    from contract.resolve import resolve_run

    meta = json.loads((Path(checkpoint) / "meta.json").read_text())
    return resolve_run(parse_config(meta["config"], f"{checkpoint}/meta.json")), meta


def torch_backend(checkpoint: str | Path):
    """-> (run, ci_of_inputs) from a torch-oracle checkpoint dir."""
    import torch

    from oracle_torch.checkpoint import load_checkpoint
    from oracle_torch.components import DecomposedModel
    from oracle_torch.eval import eval_ci
    from oracle_torch.train import torch_dtype

    run, meta = run_of_checkpoint(checkpoint)
    dt = torch_dtype(meta.get("dtype", run.cfg.runtime.dtype))
    state = load_checkpoint(checkpoint, run, dt)
    model = DecomposedModel(run, state.params, dt)

    def ci_of_inputs(x: np.ndarray) -> dict:
        with torch.no_grad():
            _, ci = eval_ci(run, model, state.params, torch.as_tensor(x, dtype=dt))
        return {k: v.numpy().astype(np.float64) for k, v in ci.items()}

    return run, ci_of_inputs


def jax_backend(checkpoint: str | Path):
    """-> (run, ci_of_inputs) from a JAX-trainer checkpoint dir (orbax state + meta.json)."""
    import jax
    import jax.numpy as jnp

    from jax_impl.checkpoint import load_run_checkpoint

    if json.loads((Path(checkpoint) / "meta.json").read_text()).get("dtype") == "float64":
        jax.config.update("jax_enable_x64", True)  # before any JAX array is made
    from jax_impl.components import DecomposedModel
    from jax_impl.eval import eval_ci

    state, meta, run = load_run_checkpoint(checkpoint)
    dt = jnp.dtype(meta["dtype"])
    model = DecomposedModel(run, dt)
    params = state["params"]

    def ci_of_inputs(x: np.ndarray) -> dict:
        _, ci = eval_ci(run, model, model.frozen, params, jnp.asarray(x, dt))
        return {k: np.asarray(v).astype(np.float64) for k, v in ci.items()}

    return run, ci_of_inputs


BACKENDS: dict[str, Callable] = {"torch": torch_backend, "jax": jax_backend}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity.tms_recovery", description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="torch", help=f"one of {sorted(BACKENDS)}")
    ap.add_argument("--checkpoint", required=True, help="checkpoint dir (RUN/checkpoints/step_X) or a run dir")
    ap.add_argument("--out", required=True, help="PNG heat map path")
    ap.add_argument("--threshold", type=float, default=THRESHOLD)
    ap.add_argument("--json", help="also write the scores as JSON here")
    args = ap.parse_args(argv)
    if args.backend not in BACKENDS:
        print(f"tms_recovery: error: unknown backend {args.backend!r} (have {sorted(BACKENDS)})", file=sys.stderr)
        return 2
    ck = Path(args.checkpoint)
    if not (ck / "meta.json").is_file() and (ck / "checkpoints").is_dir():
        steps = sorted(p for p in (ck / "checkpoints").iterdir() if p.name.startswith("step_"))
        if steps:
            ck = steps[-1]
    if not (ck / "meta.json").is_file():
        print(f"tms_recovery: error: {args.checkpoint} is not a checkpoint directory (no meta.json)", file=sys.stderr)
        return 2
    run, ci_of_inputs = BACKENDS[args.backend](ck)
    if run.cfg.target.kind != "tms":
        print(f"tms_recovery: error: {ck} decomposes a {run.cfg.target.kind!r} target, not tms", file=sys.stderr)
        return 2
    n_features = run.target_meta["config"]["n_features"]
    scores = recovery_scores(ci_of_inputs, n_features, args.threshold)
    print(format_table(scores))
    png = plot_heatmap({k: np.asarray(v) for k, v in scores["ci"].items()}, args.out, args.threshold,
                       title=f"{ck} ({args.backend})")
    print(f"heat map: {png}")
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in scores.items()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
