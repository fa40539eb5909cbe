"""Throughput of both trainers against this machine's own matmul peak (not a test; S122).

    .venv/bin/python scripts/benchmark.py [--configs NAME ...] [--steps N] [--rounds K] [--warmup W]
                                          [--json FILE] [--plot FILE.png] [--sweep C sites seq | --sweep none]
                                          [--sweep-config NAME] [--sweep-steps N] [--torch-threads T]

ONE process measures, in K interleaved rounds (so a slow spell of a shared machine hits every
measurement alike): the machine's float32 matmul peak (square GEMMs of 1024 and 2048 through
XLA and through torch, the best of three each), then for every config (default: every
configs/*.yaml) a block of N steps of the JAX step and a block of N steps of the oracle step.
Both backends come from `loop.backends.make_backend` and are driven through the backend
interface (`train_step(state, k, batch)`, the production path: draws sampled inside the
step), in float32 from the same initial state on numpy batches made beforehand; the
faithfulness warmup is skipped. A backend's steps/s is its best round.

Per config and trainer it prints steps/s, tokens/s (positions per step × steps/s; a toy
target's position is one batch row), the model FLOPs of one step (`contract/flops.py`, S121,
the same count for both trainers), achieved FLOP/s (model FLOPs × steps/s), MFU = achieved /
measured peak (and CPU-MFU: model FLOPs per CPU-second of the process against the peak
GEMMs' FLOPs per CPU-second, which other load on a shared machine does not lower), the compile time (the first step: trace + compile + one step for JAX, the
first step for the oracle), the peak RSS while that trainer stepped (the process's VmHWM,
reset before each of its blocks; the process holds every backend, so this is the whole
process's resident peak), and for JAX XLA's memory analysis of the compiled step. Then the
cross-check of the analytic count against XLA's cost analysis of the compiled JAX step: the
dot FLOPs of the optimised HLO, XLA's FLOPs before and after optimisation (which count
elementwise work too, after optimisation once per fused use) and its bytes accessed.

Then (JAX only, unless `--sweep none`) how step time grows on `--sweep-config` (default
llama_scaled) with C (every site's C × 1/4, 1/2, 1, 2), with the number of live sites (the
first 1/4, 1/2, 3/4, all of the expanded sites) and with the sequence length (32 to 256, a
llama only); printed with the log-log slope between the two largest points, and drawn in
`--plot` (default benchmark_scaling.png) beside the growth of the analytic FLOPs.

`--json FILE` writes `{"peak_flops": F, "configs": {name: {"jax": {...}, "oracle": {...}}}}`,
each with `steps_per_s`, `model_flops_per_step`, `mfu` (a fraction), `compile_s`, `peak_rss_mb`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

SWEEP_AXES = ("C", "sites", "seq")
C_FACTORS = (0.25, 0.5, 1.0, 2.0)
SITE_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
SEQ_LENS = (32, 64, 128, 256)


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))


def config_dict(name: str, steps: int) -> dict:
    from contract.config_file import load_config

    path = REPO / "configs" / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"benchmark: --configs: no config {path} (shipped: {', '.join(shipped_configs())})")
    d = load_config(path).to_dict()
    d["runtime"]["dtype"] = "float32"
    d["steps"] = max(d["steps"], steps)  # schedules stay those of a real run
    return d


def resolve(d: dict, name: str):
    from contract.config import parse_config
    from contract.resolve import resolve_run

    return resolve_run(parse_config(d, name))


def sweep_config(d: dict, axis: str, value: float, site_list: list[tuple[str, int]]) -> dict:
    """`d` with one scaling knob set: axis 'C' multiplies every site's C by `value`; 'sites'
    keeps the first `value` sites of `site_list` (the expanded (module, C) list, each as an
    exact pattern); 'seq' sets data.seq_len to `value`."""
    d = json.loads(json.dumps(d))
    if axis == "C":
        d["sites"] = [{**s, "C": max(1, round(s["C"] * value))} for s in d["sites"]]
    elif axis == "sites":
        d["sites"] = [{"pattern": n, "C": c} for n, c in site_list[:int(value)]]
        chunks = [t for t in d["loss_terms"] if "sites_per_chunk" in t]
        for t in chunks:
            t["sites_per_chunk"] = min(t["sites_per_chunk"], int(value))
    elif axis == "seq":
        d["data"]["seq_len"] = int(value)
    else:
        raise ValueError(f"sweep axis {axis!r} (one of {', '.join(SWEEP_AXES)})")
    return d


# ---------------------------------------------------------------- measurements
def peak_rss_reset() -> bool:
    """Reset the process's peak RSS (Linux: `5` to /proc/self/clear_refs). False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """The process's peak RSS since the last reset (VmHWM), else since start (ru_maxrss)."""
    try:
        m = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
        if m:
            return int(m.group(1)) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gemm_peak(reps: int = 3) -> dict[str, float]:
    """Best FLOP/s of square float32 GEMMs (1024, 2048) through XLA and through torch, per
    wall-second (`xla`, `torch`) and per CPU-second of the process (`xla_cpu`, `torch_cpu`:
    the per-core rate, which other load on the machine does not lower)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    out = {"xla": 0.0, "torch": 0.0, "xla_cpu": 0.0, "torch_cpu": 0.0}
    mm = jax.jit(jnp.matmul)
    for n in (1024, 2048):
        a = np.random.default_rng(n).standard_normal((n, n), dtype=np.float32)
        ja, jb = jnp.asarray(a), jnp.asarray(a.T.copy())
        ta, tb = torch.from_numpy(a), torch.from_numpy(a.T.copy())
        mm(ja, jb).block_until_ready()
        torch.matmul(ta, tb)
        runs = {"xla": lambda ja=ja, jb=jb: mm(ja, jb).block_until_ready(),
                "torch": lambda ta=ta, tb=tb: torch.matmul(ta, tb)}
        for _ in range(reps):
            for k, f in runs.items():
                c, t = time.process_time(), time.perf_counter()
                f()
                t, c = time.perf_counter() - t, time.process_time() - c
                out[k] = max(out[k], 2 * n**3 / t)
                out[f"{k}_cpu"] = max(out[f"{k}_cpu"], 2 * n**3 / max(c, 1e-9))
    return out


class Bench:
    """One backend's production `train_step` on pre-made numpy batches; `block(ks)` times steps ks."""

    def __init__(self, name: str, run, batches: list):
        from loop.backends import make_backend

        self.name, self.batches = name, batches
        self.backend = make_backend(name, run)
        self.state = self.backend.new_state()
        self.rss = 0.0
        self.cpu: list[float] = []  # process CPU seconds of each timed block
        self.compile_s = self.block([0])  # JAX: trace + compile + one step; oracle: its first step
        self.cpu.clear()

    def block(self, ks) -> float:
        reset = peak_rss_reset()
        c, t = time.process_time(), time.perf_counter()
        for k in ks:
            self.state, self.m = self.backend.train_step(self.state, k, self.batches[k])
        if self.name == "jax":
            import jax
            jax.block_until_ready((self.state, self.m))
        dt = time.perf_counter() - t
        self.cpu.append(time.process_time() - c)
        self.rss = max(self.rss, peak_rss_mb()) if reset else peak_rss_mb()
        return dt

    def loss(self) -> float:
        return self.backend.host_metrics(self.m)["loss/total"]


def build(name: str, n_steps: int, with_cost: bool = True) -> dict:
    """A config's run, batches, both benches, the analytic FLOPs and XLA's cost of the JAX step."""
    from contract.data import batch_for_step
    from contract.flops import step_flops

    run = resolve(config_dict(name, n_steps), name)
    batches = [batch_for_step(run, run.cfg.seed, k) for k in range(n_steps)]
    print(f"[{name}] building and compiling both trainers ...", file=sys.stderr, flush=True)
    j, o = Bench("jax", run, batches), Bench("torch", run, batches)
    from jax_impl.cost import step_cost  # XLA's cost of the compiled JAX step: a JAX-only diagnostic

    cost = step_cost(j.backend, j.state, 0, batches[0]) if with_cost else {}
    return {"name": name, "run": run, "jax": j, "oracle": o, "flops": step_flops(run),
            "positions": math.prod(run.batch_shape), "cost": cost, "t": {"jax": [], "oracle": []},
            "cpu": {"jax": [], "oracle": []}}


def sweep(name: str, axes: list[str], steps: int, warmup: int) -> list[dict]:
    """JAX step time at every point of every axis (module doc), best of two blocks."""
    from contract.data import batch_for_step
    from contract.flops import step_flops

    n_steps = 1 + warmup + 2 * steps
    base = config_dict(name, n_steps)
    run0 = resolve(base, name)
    site_list = [(s.name, s.C) for s in run0.sites]
    n = len(site_list)
    points = {"C": C_FACTORS, "sites": sorted({max(1, round(f * n)) for f in SITE_FRACTIONS}), "seq": SEQ_LENS}
    out = []
    for axis in axes:
        if axis == "seq" and run0.cfg.target.kind != "llama":
            print(f"[sweep] {name} has no sequence axis; seq skipped", file=sys.stderr)
            continue
        for v in points[axis]:
            run = resolve(sweep_config(base, axis, v, site_list), f"{name} ({axis}={v})")
            batches = [batch_for_step(run, run.cfg.seed, k) for k in range(n_steps)]
            print(f"[sweep] {name} {axis}={v} ...", file=sys.stderr, flush=True)
            b = Bench("jax", run, batches)
            b.block(range(1, 1 + warmup))
            ts = [b.block(range(1 + warmup + r * steps, 1 + warmup + (r + 1) * steps)) for r in range(2)]
            out.append({"axis": axis, "value": v, "ms_per_step": min(ts) / steps * 1e3,
                        "model_flops_per_step": step_flops(run).total, "compile_s": b.compile_s})
            b.backend.close()
            del b
    return out


def loglog_slope(rows: list[dict], key: str) -> float:
    """d log(key) / d log(value) between the two largest points of one axis."""
    a, b = sorted(rows, key=lambda r: r["value"])[-2:]
    return math.log(b[key] / a[key]) / math.log(b["value"] / a["value"])


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = [a for a in SWEEP_AXES if any(r["axis"] == a for r in rows)]
    fig, axs = plt.subplots(1, len(axes), figsize=(4.2 * len(axes), 3.6), squeeze=False)
    labels = {"C": "C multiplier (every site)", "sites": "live sites", "seq": "sequence length"}
    for ax, a in zip(axs[0], axes, strict=True):
        rs = sorted((r for r in rows if r["axis"] == a), key=lambda r: r["value"])
        x = [r["value"] for r in rs]
        t = [r["ms_per_step"] for r in rs]
        ref = rs[-1]
        f = [ref["ms_per_step"] * r["model_flops_per_step"] / ref["model_flops_per_step"] for r in rs]
        lin = [ref["ms_per_step"] * v / ref["value"] for v in x]
        ax.loglog(x, t, "o-", label="JAX step (measured)")
        ax.loglog(x, f, "s--", label="∝ model FLOPs")
        ax.loglog(x, lin, ":", color="gray", label="linear")
        ax.set_xticks(x, [f"{v:g}" for v in x])
        ax.minorticks_off()
        ax.set_xlabel(labels[a])
        ax.set_ylabel("ms / step")
        ax.set_title(f"slope {loglog_slope(rs, 'ms_per_step'):.2f} (FLOPs {loglog_slope(rs, 'model_flops_per_step'):.2f})",
                     fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/benchmark.py", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=None, help="config names under configs/ (default: all)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round, trainer and config")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (peak GEMM, then each config's JAX and oracle block)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compile) step")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--sweep", nargs="+", default=list(SWEEP_AXES), choices=[*SWEEP_AXES, "none"],
                    help="scaling curves of the JAX step to measure (none: skip)")
    ap.add_argument("--sweep-config", default="llama_scaled", help="the config the scaling curves vary")
    ap.add_argument("--sweep-steps", type=int, default=3, help="timed steps per sweep point (best of 2 blocks)")
    ap.add_argument("--plot", default="benchmark_scaling.png", help="PNG of the scaling curves")
    ap.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0 or args.sweep_steps < 1:
        ap.error("--steps, --rounds and --sweep-steps must be >= 1, --warmup >= 0")
    if "none" in args.sweep and len(args.sweep) > 1:
        ap.error("--sweep none takes no other axis")
    names = args.configs or shipped_configs()

    import jax
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    n_steps = 1 + args.warmup + args.rounds * args.steps
    benches = [build(n, n_steps) for n in names]
    for b in benches:
        ks = list(range(1, 1 + args.warmup))
        b["jax"].block(ks)
        b["oracle"].block(ks)
    peaks: dict[str, float] = {"xla": 0.0, "torch": 0.0, "xla_cpu": 0.0, "torch_cpu": 0.0}
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}: peak GEMM, then " + ", ".join(names), file=sys.stderr, flush=True)
        for k, v in gemm_peak().items():
            peaks[k] = max(peaks[k], v)
        timed = range(1 + args.warmup + r * args.steps, 1 + args.warmup + (r + 1) * args.steps)
        for b in benches:
            for who in ("jax", "oracle"):
                b[who].cpu.clear()  # only the timed blocks' CPU time is kept (`cpu_best`)
                b["t"][who].append(b[who].block(timed))
                b["cpu"][who].append(b[who].cpu[-1])
    peak = max(peaks["xla"], peaks["torch"])
    core_peak = max(peaks["xla_cpu"], peaks["torch_cpu"])  # FLOPs per CPU-second

    results: dict = {"peak_flops": peak, "configs": {}}
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nfloat32, best of {args.rounds} interleaved rounds of {args.steps} steps after {args.warmup} warm-up steps; "
          f"cpu count {os.cpu_count()}, load avg {load1:.2f}, jax {jax.__version__} ({jax.default_backend()}), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"measured matmul peak (float32 GEMM 1024/2048, best): XLA {peaks['xla'] / 1e9:.1f} GFLOP/s, "
          f"torch {peaks['torch'] / 1e9:.1f} GFLOP/s -> peak {peak / 1e9:.1f} GFLOP/s; per CPU-second "
          f"{core_peak / 1e9:.1f} GFLOP (one core)\n")
    hdr = (f"{'config':<13} {'trainer':<7} {'steps/s':>8} {'tokens/s':>9} {'GFLOP/step':>10} {'GFLOP/s':>8} "
           f"{'MFU':>6} {'CPU-MFU':>7} {'compile s':>9} {'peak RSS MB':>11} {'XLA MB':>7} {'JAX/oracle':>10}")
    print(hdr)
    print("-" * len(hdr))
    for b in benches:
        flops = b["flops"].total
        row = {}
        sps = {w: args.steps / min(b["t"][w]) for w in ("jax", "oracle")}
        ratios = sorted(o / j for j, o in zip(b["t"]["jax"], b["t"]["oracle"], strict=True))
        for who in ("jax", "oracle"):
            bench = b[who]
            row[who] = {"steps_per_s": sps[who], "model_flops_per_step": flops, "mfu": flops * sps[who] / peak,
                        "compile_s": bench.compile_s, "peak_rss_mb": bench.rss}
            xla = f"{b['cost']['peak'] / 2**20:7.0f}" if who == "jax" and b["cost"] else f"{'-':>7}"
            # model FLOPs per CPU-second of the process against the GEMMs' FLOPs per CPU-second:
            # robust to other load on a shared machine (spin-waiting threads count as busy)
            cpu_mfu = flops * args.steps / min(b["cpu"][who]) / core_peak
            ratio = f"{sps['jax'] / sps['oracle']:5.2f}x {ratios[0]:.2f}-{ratios[-1]:.2f}" if who == "jax" else ""
            print(f"{b['name'] if who == 'jax' else '':<13} {who:<7} {sps[who]:8.2f} {sps[who] * b['positions']:9.0f} "
                  f"{flops / 1e9:10.3f} {flops * sps[who] / 1e9:8.1f} {100 * row[who]['mfu']:5.1f}% {100 * cpu_mfu:6.1f}% "
                  f"{bench.compile_s:9.1f} {bench.rss:11.0f} {xla} {ratio:>10}")
        results["configs"][b["name"]] = row
    print("\n(MFU = model FLOPs x steps/s / measured peak; CPU-MFU = model FLOPs per CPU-second of the process "
          "(best block) / the peak GEMMs' FLOPs per CPU-second, which other load on the machine does not lower; "
          "JAX/oracle: ratio of the "
          "best rounds, then the range of the per-round ratios)")

    print("\nanalytic model FLOPs vs XLA's cost analysis of the compiled JAX step (GFLOP/step)")
    hdr = (f"{'config':<13} {'analytic':>9} {'XLA dots':>9} {'dots/an.':>8} {'XLA unopt':>9} {'XLA opt':>9} "
           f"{'GB accessed':>11} {'FLOP/byte':>9}  analytic parts (GFLOP, fwd+bwd)")
    print(hdr)
    print("-" * len(hdr))
    for b in benches:
        c, f = b["cost"], b["flops"]
        parts = ", ".join(f"{k} {v.total / 1e9:.3g}" for k, v in f.parts.items())
        if not c:
            print(f"{b['name']:<13} {f.total / 1e9:9.3f}  (no XLA cost)  {parts}")
            continue
        print(f"{b['name']:<13} {f.total / 1e9:9.3f} {c['dot_flops'] / 1e9:9.3f} {c['dot_flops'] / f.total:8.3f} "
              f"{c['flops_unoptimised'] / 1e9:9.3f} {c['flops'] / 1e9:9.3f} {c['bytes_accessed'] / 1e9:11.3f} "
              f"{c['flops'] / max(c['bytes_accessed'], 1):9.1f}  {parts}")

    if args.sweep != ["none"]:
        rows = sweep(args.sweep_config, args.sweep, args.sweep_steps, 1)
        print(f"\nJAX step time vs scale on {args.sweep_config} (best of 2 blocks of {args.sweep_steps} steps)")
        print(f"{'axis':<6} {'value':>6} {'ms/step':>9} {'GFLOP/step':>10} {'GFLOP/s':>8} {'MFU':>6} {'compile s':>9}")
        for r in rows:
            gfs = r["model_flops_per_step"] / r["ms_per_step"] * 1e3
            print(f"{r['axis']:<6} {r['value']:>6g} {r['ms_per_step']:9.1f} {r['model_flops_per_step'] / 1e9:10.3f} "
                  f"{gfs / 1e9:8.1f} {100 * gfs / peak:5.1f}% {r['compile_s']:9.1f}")
        for a in SWEEP_AXES:
            rs = [r for r in rows if r["axis"] == a]
            if len(rs) >= 2:
                print(f"  {a}: log-log slope of step time {loglog_slope(rs, 'ms_per_step'):.2f} "
                      f"(model FLOPs {loglog_slope(rs, 'model_flops_per_step'):.2f}) between the two largest points")
        if rows:
            plot(rows, args.plot, f"JAX step time vs scale, {args.sweep_config} (float32, {os.cpu_count()} cores)")
            print(f"scaling curves: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    for b in benches:
        for who in ("jax", "oracle"):
            b[who].backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
