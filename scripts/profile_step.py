"""Where the JAX training step spends its time (not a test).

    .venv/bin/python scripts/profile_step.py [CONFIG] [--steps N] [--top K] [--dtype float32|float64]

Runs the production step (`Stepper.step_with_key`) of configs/CONFIG.yaml under
`jax.profiler.trace`, then prints the wall time per step, the summed op time per step, and
the op time grouped by XLA op kind (`ynn_fusion` = matmuls through YNNPACK, `dot` = Eigen
matmuls, `copy_*` = layout copies, other `*_fusion` = elementwise loops), by kind and
output shape, and the slowest single ops with their HLO metadata. Per-op times overlap when
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


def op_times(trace_dir: str) -> dict[str, float]:
    """Summed duration (µs) per trace event name of the newest perfetto trace in trace_dir."""
    files = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))
    if not files:
        raise SystemExit(f"profile_step: jax.profiler wrote no perfetto trace under {trace_dir}")
    events = json.load(gzip.open(files[-1]))["traceEvents"]
    agg: dict[str, float] = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(_RUNTIME_EVENTS):
            agg[e["name"]] += e.get("dur", 0)
    return agg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/profile_step.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", nargs="?", default="tiny_llama", help="config name under configs/")
    ap.add_argument("--steps", type=int, default=5, help="profiled steps (after 3 warm-up steps)")
    ap.add_argument("--top", type=int, default=15, help="rows per table")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = ap.parse_args(argv)
    if args.dtype == "float64":
        os.environ["JAX_ENABLE_X64"] = "1"

    import jax

    from contract.data import batch_for_step
    from contract.runlog import load_run
    from jax_impl.eval import to_jax_batch
    from jax_impl.train import jax_dtype, make_state, prng_key, runtime_for

    path = REPO / "configs" / f"{args.config}.yaml"
    if not path.exists():
        raise SystemExit(f"profile_step: no config {path}")
    run = load_run(str(path), dtype=args.dtype)
    dt = jax_dtype(args.dtype)
    run, model, stepper = runtime_for(run, dt)
    state = make_state(run, None, dt)
    batch = to_jax_batch(batch_for_step(run, run.cfg.seed, 0), dt)
    for k in range(3):
        state, _ = stepper.step_with_key(state, batch, k)
    jax.block_until_ready(state)

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            t = time.perf_counter()
            for k in range(args.steps):
                state, _ = stepper.step_with_key(state, batch, k)
            jax.block_until_ready(state)
            wall = (time.perf_counter() - t) / args.steps * 1e3
        agg = op_times(tmp)
    mesh = run.cfg.runtime.mesh.data
    hlo = stepper._key.lower(state, model.frozen, batch, prng_key(run.cfg.seed, mesh), stepper.hp(0)).compile().as_text()
    ops = hlo_ops(hlo)

    n = args.steps
    per_step = {k: v / n / 1e3 for k, v in agg.items()}  # ms per step
    by_kind: dict[str, float] = collections.Counter()
    count: dict[str, int] = collections.Counter()
    by_shape: dict[tuple, float] = collections.Counter()
    for name, ms in per_step.items():
        kind = re.sub(r"\.\d+$", "", name)
        by_kind[kind] += ms
        count[kind] += 1
        by_shape[(kind, ops.get(name, ("?", ""))[0])] += ms
    print(f"{args.config} ({args.dtype}): wall {wall:.1f} ms/step, summed op time {sum(per_step.values()):.1f} ms/step, "
          f"{len(per_step)} ops, cpu count {os.cpu_count()}")
    print(f"\n{'ms/step':>8} {'ops':>5}  op kind")
    for kind, ms in by_kind.most_common(args.top):
        print(f"{ms:8.2f} {count[kind]:5d}  {kind}")
    print(f"\n{'ms/step':>8}  op kind, output type")
    for (kind, shape), ms in by_shape.most_common(args.top):
        print(f"{ms:8.2f}  {kind:<28} {shape}")
    print(f"\n{'ms/step':>8}  slowest ops (HLO name, output type, source op)")
    for name, ms in sorted(per_step.items(), key=lambda kv: -kv[1])[:args.top]:
        shape, src = ops.get(name, ("?", ""))
        print(f"{ms:8.2f}  {name:<28} {shape:<24} {src[:70]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
