"""Trajectory plots: one PNG per case overlaying the oracle and JAX trajectories of every
loss term, with the relative error on a log axis beneath.

  python -m parity.plots [--cases NAME ...] [--out DIR]     (default DIR: runs/parity_plots)

The oracle side is the committed golden; the JAX side is run live."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from parity.cases import CASES
from parity.goldens import load_golden
from parity.runners import make_inputs, run_jax


def plot_case(name: str, oracle: list[dict], jax_records: list[dict], out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(k for k in oracle[0] if k.startswith("loss/"))
    fig, axes = plt.subplots(2, len(keys), figsize=(3.2 * len(keys), 5.2), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [2, 1]})
    steps = np.arange(len(oracle))
    for j, k in enumerate(keys):
        o = np.array([r[k] for r in oracle], dtype=np.float64)
        x = np.array([r[k] for r in jax_records], dtype=np.float64)
        top, bot = axes[0, j], axes[1, j]
        top.plot(steps, o, "-", lw=2.5, color="tab:blue", alpha=0.6, label="oracle (golden)")
        top.plot(steps, x, "--", lw=1.2, color="tab:red", label="jax")
        top.set_title(k.removeprefix("loss/"), fontsize=9)
        rel = np.abs(o - x) / np.maximum(np.maximum(np.abs(o), np.abs(x)), 1e-30)
        bot.semilogy(steps, np.maximum(rel, 1e-18), ".-", ms=3, color="k")
        bot.set_ylim(1e-18, 1)
        bot.set_xlabel("step")
        if j == 0:
            top.legend(fontsize=7)
            bot.set_ylabel("rel. error")
    fig.suptitle(f"{name} ({CASES[name].precision})")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity.plots", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", help="case names (default: the trajectory cases)")
    ap.add_argument("--out", default="runs/parity_plots")
    a = ap.parse_args(argv)
    names = a.cases or [n for n, c in CASES.items() if c.steps > 1]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"unknown case(s): {unknown}; known: {sorted(CASES)}", file=sys.stderr)
        return 2
    import jax
    jax.config.update("jax_enable_x64", True)
    for n in names:
        case = CASES[n]
        records, _, _ = run_jax(make_inputs(case.run(), case.precision, case.steps), grads_at_step0=False)
        print(plot_case(n, load_golden(n).trajectory, records, Path(a.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
