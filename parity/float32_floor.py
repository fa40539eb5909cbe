"""A long float32 run on a mesh or on several processes against float32's own noise (issue
#13, SPEC S142).

    python -m parity.float32_floor [CONFIG] [--steps N] [--out DIR] [--reuse]

In float64 the JAX trainer gives the same trajectory on every mesh and process count to
~1e-14 (parity/mesh_invariance.py). In float32 the sums over the batch and over C run in
another order on another mesh, and over hundreds of steps that rounding grows through the CI
function's hard thresholds (a leaky-hard branch or an l0 count flips, and Adam carries the
flip on): two float32 runs that differ only in the order of their sums separate by more than
any fixed float32 tolerance. The yardstick that stays meaningful is how far float32 rounding
alone moves the same run on one device: three controls, each the one-device float32 run
compiled with other vector lanes for XLA's reductions (`--xla_cpu_prefer_vector_width=128` or
`=512`, `--xla_cpu_max_isa=SSE4_2`), so every sum XLA emits rounds differently (3e-7 to 5e-7
at step 0 on the tiny LM, the size of the mesh's own step-0 difference), the same program
otherwise; `ctrl32` is the worst of the three (one sample of a chaotic quantity is not a floor). A mesh run is the same run when,
for every kind of metric (the name's prefix: loss, grad_norm, l0, eval, ...),

    worst dev(mesh32, ref32) <= FLOOR_FACTOR * worst dev(ctrl32, ref32)

dev being the relative error at a logged step (floor 1e-6, float32's term row) and worst the
maximum over the kind's metrics and every logged step. Per kind and not per metric: which
metric a flipped threshold moves most is chance, how far the flips carry a kind is not. A
difference of the math (another draw, a missing term, a wrong all-reduce) shows at step 0
already, orders of magnitude above both (parity/mesh_invariance.py checks step 0 to 1e-5).

(The float64 run is no yardstick: float32's rounding does not scatter the run around the
float64 trajectory, it drifts from it. On the tiny LM the one-device float32 run is 10% from
the float64 one in loss/total after 300 steps, 400 times the mesh's difference.)

Runs the config (default configs/tiny_llama.yaml) for N steps (default 300) six times through
`python -m jax_impl.cli train`, all float32: on (1, 1), the three controls, on a (2, 2) mesh in
one process of 4 simulated devices, and the same (2, 2) run as 2 processes x 2 devices;
prints the worst deviation per kind and metric and the verdict, and writes them to
DIR/float32_floor.json and a plot of the deviation over the steps to DIR/float32_floor.png."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from contract.targets import REPO_ROOT
from parity.goldens import rel_err

FLOOR_FACTOR = 2.0  # see the docstring: two independent float32 roundings of one trajectory
# the controls: the same one-device program, its sums rounded otherwise (XLA vectorises its
# reductions over other lanes; each moves step 0 of the tiny LM by 3e-7 to 5e-7)
CONTROLS = {"ctrl32_v128": "--xla_cpu_prefer_vector_width=128", "ctrl32_v512": "--xla_cpu_prefer_vector_width=512",
            "ctrl32_sse": "--xla_cpu_max_isa=SSE4_2"}
REL_FLOOR = 1e-6  # parity/tolerances.py ("float32", "term").floor
TIMEOUT = int(os.environ.get("VPD_FLOOR_TIMEOUT", "3600"))  # s per run
# name -> (mesh, processes, extra XLA flags); every run float32
RUNS = {"ref32": ((1, 1), 1, ""), **{n: ((1, 1), 1, f) for n, f in CONTROLS.items()},
        "mesh32": ((2, 2), 1, ""), "proc32": ((2, 2), 2, "")}
MESH_RUNS = ("mesh32", "proc32")


def _config(src: Path, mesh: tuple[int, int], dst: Path) -> Path:
    d = yaml.safe_load(src.read_text())
    d["runtime"] = dict(d.get("runtime") or {}, mesh={"data": mesh[0], "components": mesh[1]})
    dst.write_text(yaml.safe_dump(d, sort_keys=False))
    return dst


def train(config: Path, name: str, steps: int, out: Path) -> Path:
    """One run of RUNS[name] in its own process(es); its run directory."""
    mesh, procs, flags = RUNS[name]
    run_dir = out / name
    cfg = _config(config, mesh, out / f"{name}.yaml")
    env = dict(os.environ, JAX_PLATFORMS="cpu", WANDB_MODE="disabled", PYTHONPATH=str(REPO_ROOT))
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_NUM_CPU_DEVICES", "XLA_FLAGS"):
        env.pop(k, None)
    if procs == 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={mesh[0] * mesh[1]} {flags}".strip()
    cmd = [sys.executable, "-m", "jax_impl.cli", "train", str(cfg), "--out", str(run_dir), "--steps", str(steps),
           "--dtype", "float32", "--no-resume", "--quiet"] + (["--processes", str(procs)] if procs > 1 else [])
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if p.returncode != 0:
        raise RuntimeError(f"run {name} (mesh {mesh}, {procs} process(es)) failed (exit {p.returncode}):\n"
                           f"{p.stderr[-3000:]}")
    print(f"  {name}: mesh {mesh} x {procs} process(es) {flags}, {steps} steps in {time.perf_counter() - t0:.0f} s",
          flush=True)
    return run_dir


def read_metrics(run_dir: Path) -> dict[tuple[int, str], float]:
    """(step, metric) -> value of every numeric metric in run_dir/metrics.jsonl."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        k = rec.pop("step")
        out |= {(k, m): float(v) for m, v in rec.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return out


def deviations(a: dict, b: dict) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, relative error)] over the (step, metric) pairs both runs logged; a
    pair only one of them logged is an error (the runs did not log the same steps)."""
    if a.keys() != b.keys():
        raise ValueError(f"the runs logged different (step, metric) pairs, e.g. {sorted(a.keys() ^ b.keys())[:5]}")
    out: dict[str, list] = {}
    for (k, m) in sorted(a):
        out.setdefault(m, []).append((k, rel_err(a[k, m], b[k, m], REL_FLOOR)))
    return out


def kind(metric: str) -> str:
    return metric.split("/")[0]


def verdict(metrics: dict[str, dict[tuple[int, str], float]]
            ) -> tuple[list[dict], dict[str, dict[str, float]], bool]:
    """(per-kind rows, per-metric worst deviations, ok): the worst deviation from ref32 of each
    control, of the worst control (`ctrl32`) and of each mesh run, per kind of metric and per
    metric; ok when every mesh run is within FLOOR_FACTOR x `ctrl32` in every kind."""
    dev = {n: deviations(metrics[n], metrics["ref32"]) for n in (*CONTROLS, *MESH_RUNS)}
    per_metric: dict[str, dict[str, float]] = {
        m: {n: max(e for _, e in d[m]) for n, d in dev.items()} for m in dev[MESH_RUNS[0]]}
    for r in per_metric.values():
        r["ctrl32"] = max(r[n] for n in CONTROLS)
    kinds: list[dict] = []
    ok = True
    for k in sorted({kind(m) for m in per_metric}):
        rows = [r for m, r in per_metric.items() if kind(m) == k]
        worst = {n: max(r[n] for r in rows) for n in ("ctrl32", *MESH_RUNS)}
        allowed = FLOOR_FACTOR * worst["ctrl32"] + 1e-12
        good = all(worst[n] <= allowed for n in MESH_RUNS)
        kinds.append({"kind": k, "metrics": len(rows), **worst, "allowed": allowed, "ok": good})
        ok &= good
    return kinds, per_metric, ok


def plot(metrics: dict, per_kind: list[dict], path: Path) -> None:
    """Per kind of metric, the worst deviation from ref32 at each logged step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ks = [r["kind"] for r in per_kind if max(r[n] for n in ("ctrl32", *MESH_RUNS)) > 0] or [per_kind[0]["kind"]]
    fig, axes = plt.subplots(1, len(ks), figsize=(3.6 * len(ks), 3.2), squeeze=False)
    for ax, k in zip(axes[0], ks, strict=True):
        for n, runs, style in (("ctrl32", CONTROLS, "k-"), ("mesh32", ["mesh32"], "C0--"), ("proc32", ["proc32"], "C1:")):
            worst: dict[int, float] = {}
            for r in runs:
                for m, pts in deviations(metrics[r], metrics["ref32"]).items():
                    if kind(m) == k:
                        for step, e in pts:
                            worst[step] = max(worst.get(step, 0.0), e)
            steps = sorted(worst)
            ax.semilogy(steps, [max(worst[t], 1e-9) for t in steps], style, marker=".", ms=3, label=f"{n} vs ref32")
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("worst relative error")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity.float32_floor", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default=str(REPO_ROOT / "configs" / "tiny_llama.yaml"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default="runs/float32_floor", help="where the four runs and the report go")
    ap.add_argument("--reuse", action="store_true", help="compare the runs already in --out instead of training")
    ap.add_argument("--top", type=int, default=12, help="how many single metrics to list")
    a = ap.parse_args(argv)
    config, out = Path(a.config).resolve(), Path(a.out).resolve()
    if not config.is_file():
        print(f"config {config} does not exist", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    print(f"{config.name}, {a.steps} steps: {len(RUNS)} runs in {out}", flush=True)
    dirs = {n: (out / n if a.reuse else train(config, n, a.steps, out)) for n in RUNS}
    metrics = {n: read_metrics(d) for n, d in dirs.items()}
    per_kind, per_metric, ok = verdict(metrics)
    print(f"\nworst relative error from ref32 over {a.steps} steps (floor {REL_FLOOR:g}); the mesh runs pass "
          f"when within {FLOOR_FACTOR:g} x the control's in every kind")
    print(f"{'kind':12s} {'metrics':>7s} {'ctrl32':>9s} {'mesh32':>9s} {'proc32':>9s} {'allowed':>9s}")
    for r in per_kind:
        print(f"{r['kind']:12s} {r['metrics']:7d} {r['ctrl32']:9.2e} {r['mesh32']:9.2e} {r['proc32']:9.2e} "
              f"{r['allowed']:9.2e}{'' if r['ok'] else '  OVER'}")
    print(f"\nthe {a.top} metrics farthest from ref32 in any run:")
    for m, r in sorted(per_metric.items(), key=lambda mr: -max(mr[1][n] for n in ("ctrl32", *MESH_RUNS)))[:a.top]:
        print(f"  {m:56s} ctrl32 {r['ctrl32']:8.2e}  mesh32 {r['mesh32']:8.2e}  proc32 {r['proc32']:8.2e}")
    (out / "float32_floor.json").write_text(json.dumps({"config": str(config), "steps": a.steps, "factor": FLOOR_FACTOR,
                                                        "controls": CONTROLS, "kinds": per_kind,
                                                        "metrics": per_metric, "ok": ok}, indent=1))
    plot(metrics, per_kind, out / "float32_floor.png")
    print(f"\n{'PASS' if ok else 'FAIL'}: {sum(r['ok'] for r in per_kind)} of {len(per_kind)} kinds of metric within "
          f"the float32 floor; report {out / 'float32_floor.json'}, plot {out / 'float32_floor.png'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
