"""Where the JAX training step spends its time (not a test).

    .venv/bin/python scripts/profile_step.py [CONFIG] [--steps N] [--top K] [--dtype float32|float64]

Runs the production step of configs/CONFIG.yaml (`backend.train_step(state, k, batch)` of
`make_backend("jax", run)`, draws sampled inside the jitted step) under `jax.profiler.trace`,
reads the compiled step's HLO from XLA's own dump (`--xla_dump_to`, the module whose
instructions the trace ran), then prints the wall time per step, the summed op time per step, and
the op time grouped by XLA op kind (`ynn_fusion` = matmuls through YNNPACK, `dot` = Eigen
matmuls, `copy_*` = layout copies, other `*_fusion` = elementwise loops), by kind and
output shape, and the slowest single ops with their HLO metadata. Matmul ops also show their
FLOPs (from the HLO's dots, jax_impl/cost.py) and the GFLOP/s they ran at, and one line sums
the matmul time and rate against everything else. Per-op times overlap when
XLA runs ops concurrently; pin one core (`taskset -c 0 ...`) to read them as a budget.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_RUNTIME_EVENTS = ("$", "Thunk", "Slinky", "Pjit", "Common", "ParseArguments")


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
    """op name -> (output type, metadata op_name) of the compiled module's instructions."""
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ", line)
        if m:
            op = re.search(r'op_name="([^"]*)"', line)
            out[m.group(1)] = (m.group(2), op.group(1) if op else "")
    return out


def step_hlo(dump_dir: str, traced: set[str]) -> str:
    """The optimised HLO text XLA dumped for the profiled step: of every module compiled in
    this process, the one holding the most of the traced op names (the step is the only
    program that ran under the trace)."""
    best, score = "", -1
    for f in glob.glob(f"{dump_dir}/*after_optimizations.txt"):
        text = Path(f).read_text()
        n = len(traced & set(hlo_ops(text)))
        if n > score or (n == score and len(text) > len(best)):
            best, score = text, n
    if not best:
        raise SystemExit(f"profile_step: XLA dumped no optimised module under {dump_dir}")
    return best


def op_times(trace_dir: str) -> collections.Counter[str]:
    """Summed duration (µs) per trace event name of the newest perfetto trace in trace_dir."""
    files = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))
    if not files:
        raise SystemExit(f"profile_step: jax.profiler wrote no perfetto trace under {trace_dir}")
    events = json.load(gzip.open(files[-1]))["traceEvents"]
    agg: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(_RUNTIME_EVENTS):
            agg[e["name"]] += e.get("dur", 0)
    return agg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/profile_step.py", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("config", nargs="?", default="tiny_llama", help="config name under configs/")
    ap.add_argument("--steps", type=int, default=5, help="profiled steps (after 3 warm-up steps)")
    ap.add_argument("--top", type=int, default=15, help="rows per table")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = ap.parse_args(argv)
    path = REPO / "configs" / f"{args.config}.yaml"
    if not path.exists():
        raise SystemExit(f"profile_step: no config {path}")
    if args.dtype == "float64":
        os.environ["JAX_ENABLE_X64"] = "1"
    dump_dir = tempfile.mkdtemp(prefix="vpd_profile_hlo_")
    # before JAX starts: XLA writes every compiled module's optimised HLO here (text)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_dump_to={dump_dir} --xla_dump_hlo_as_text").strip()

    try:
        import jax

        from contract.data import batch_for_step
        from contract.runlog import load_run
        from jax_impl.cost import op_dot_flops
        from loop.backends import make_backend

        run = load_run(str(path), dtype=args.dtype)
        backend = make_backend("jax", run)
        state = backend.new_state()
        batch = batch_for_step(run, run.cfg.seed, 0)
        warm = 3
        for k in range(warm):
            state, m = backend.train_step(state, k, batch)
        jax.block_until_ready((state, m))

        with tempfile.TemporaryDirectory() as tmp:
            with jax.profiler.trace(tmp, create_perfetto_trace=True):
                t = time.perf_counter()
                for k in range(warm, warm + args.steps):
                    state, m = backend.train_step(state, k, batch)
                jax.block_until_ready((state, m))
                wall = (time.perf_counter() - t) / args.steps * 1e3
            agg = op_times(tmp)
        text = step_hlo(dump_dir, set(agg))
        ops, flops_of = hlo_ops(text), op_dot_flops(text)
    finally:
        shutil.rmtree(dump_dir, ignore_errors=True)

    n = args.steps
    per_step = {k: v / n / 1e3 for k, v in agg.items()}  # ms per step
    by_kind: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    by_shape: collections.Counter[tuple[str, str]] = collections.Counter()
    gf_kind: collections.defaultdict[str, float] = collections.defaultdict(float)
    gf_shape: collections.defaultdict[tuple[str, str], float] = collections.defaultdict(float)
    for name, ms in per_step.items():
        kind = re.sub(r"\.\d+$", "", name)
        shape = ops.get(name, ("?", ""))[0]
        by_kind[kind] += ms
        count[kind] += 1
        by_shape[(kind, shape)] += ms
        gf_kind[kind] += flops_of.get(name, 0.0) / 1e9
        gf_shape[(kind, shape)] += flops_of.get(name, 0.0) / 1e9

    def rate(gf: float, ms: float) -> str:  # achieved GFLOP/s of matmul ops; blank for the others
        return f"{gf / ms * 1e3:8.1f}" if gf and ms else f"{'':8}"

    mm_ms = sum(ms for name, ms in per_step.items() if flops_of.get(name))
    mm_gf = sum(flops_of.get(name, 0.0) for name in per_step) / 1e9
    total_ms = sum(per_step.values())
    print(f"{args.config} ({args.dtype}): wall {wall:.1f} ms/step, summed op time {total_ms:.1f} ms/step, "
          f"{len(per_step)} ops, cpu count {os.cpu_count()}")
    print(f"matmul ops (dots, fusions holding dots): {mm_ms:.1f} ms/step ({100 * mm_ms / max(total_ms, 1e-9):.0f}%) for "
          f"{mm_gf:.3f} GFLOP = {mm_gf / max(mm_ms, 1e-9) * 1e3:.1f} GFLOP/s; every other op {total_ms - mm_ms:.1f} ms/step")
    print(f"\n{'ms/step':>8} {'ops':>5} {'GFLOP':>8} {'GFLOP/s':>8}  op kind")
    for kind, ms in by_kind.most_common(args.top):
        gf = gf_kind[kind]
        print(f"{ms:8.2f} {count[kind]:5d} {gf:8.3f} {rate(gf, ms)}  {kind}" if gf else
              f"{ms:8.2f} {count[kind]:5d} {'':8} {'':8}  {kind}")
    print(f"\n{'ms/step':>8} {'GFLOP':>8} {'GFLOP/s':>8}  op kind, output type")
    for (kind, shape), ms in by_shape.most_common(args.top):
        gf = gf_shape[(kind, shape)]
        print(f"{ms:8.2f} {gf:8.3f} {rate(gf, ms)}  {kind:<28} {shape}" if gf else f"{ms:8.2f} {'':8} {'':8}  {kind:<28} {shape}")
    print(f"\n{'ms/step':>8}  slowest ops (HLO name, output type, source op)")
    for name, ms in sorted(per_step.items(), key=lambda kv: -kv[1])[:args.top]:
        shape, src = ops.get(name, ("?", ""))
        print(f"{ms:8.2f}  {name:<28} {shape:<24} {src[:70]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
