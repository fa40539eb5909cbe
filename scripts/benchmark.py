"""Benchmark the JAX trainer against the torch oracle (not a test).

    .venv/bin/python scripts/benchmark.py [--steps N] [--configs tms_5-2 resid_mlp1 tiny_llama]
                                          [--warmup W] [--torch-threads T] [--json OUT]

For each config, in ONE process: steady-state training steps per second of
- the JAX trainer: `Stepper.step_with_key` (production path: draws sampled inside the jitted
  step from fold_in(prng_key(seed), step)), timed after compilation with block_until_ready;
- the torch oracle: `train_step` with production draws (`draws_for_step`, a torch generator);
plus the JAX compile time (first call = trace + compile + one step). Both run the config's own
shapes in float32 from the same initial state; batches are made beforehand for both (the data
stream is shared code, not part of either trainer's step). The faithfulness warmup is skipped
(it is not part of the steady state). Prints a table with the ratio JAX / oracle.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

DEFAULT_CONFIGS = ("tms_5-2", "resid_mlp1", "tiny_llama")


def load(name: str, steps: int):
    from contract.config import load_config, parse_config
    from contract.resolve import resolve_run

    d = load_config(REPO / "configs" / f"{name}.yaml").to_dict()
    d["runtime"]["dtype"] = "float32"
    d["steps"] = max(d["steps"], steps)  # schedules stay those of a real run
    return resolve_run(parse_config(d, name))


def bench_jax(run, batches: list, warmup: int) -> dict:
    import jax
    import jax.numpy as jnp

    from jax_impl.eval import to_jax_batch
    from jax_impl.train import make_state, runtime_for

    dt = jnp.float32
    run, model, stepper = runtime_for(run, dt)
    state = make_state(run, None, dt)
    xs = [to_jax_batch(b, dt) for b in batches]
    jax.block_until_ready(xs)
    t = time.perf_counter()
    state, m = stepper.step_with_key(state, xs[0], 0)
    jax.block_until_ready((state, m))
    compile_s = time.perf_counter() - t
    for k in range(1, 1 + warmup):
        state, m = stepper.step_with_key(state, xs[k], k)
    jax.block_until_ready((state, m))
    n = len(xs) - 1 - warmup
    t = time.perf_counter()
    for k in range(1 + warmup, len(xs)):
        state, m = stepper.step_with_key(state, xs[k], k)
    jax.block_until_ready((state, m))
    el = time.perf_counter() - t
    return {"compile_s": compile_s, "steps": n, "seconds": el, "steps_per_s": n / el,
            "loss": float(m["loss/total"])}


def bench_oracle(run, batches: list, warmup: int, threads: int | None) -> dict:
    import torch

    from oracle_torch.components import DecomposedModel
    from oracle_torch.eval import to_torch_batch
    from oracle_torch.train import draws_for_step, make_state, train_step

    if threads:
        torch.set_num_threads(threads)
    dt = torch.float32
    state = make_state(run, None, dt)
    model = DecomposedModel(run, state.params, dt)
    xs = [to_torch_batch(b, dt) for b in batches]
    for k in range(0, 1 + warmup):
        m = train_step(run, model, state, xs[k], draws_for_step(run, k, dt))
    n = len(xs) - 1 - warmup
    t = time.perf_counter()
    for k in range(1 + warmup, len(xs)):
        m = train_step(run, model, state, xs[k], draws_for_step(run, k, dt))
    el = time.perf_counter() - t
    return {"steps": n, "seconds": el, "steps_per_s": n / el, "loss": m["loss/total"],
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/benchmark.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per backend and config")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps after the first (compile) step")
    ap.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="config names under configs/")
    ap.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    import jax

    from contract.data import batch_for_step

    rows = []
    for name in args.configs:
        run = load(name, args.steps + args.warmup + 1)
        batches = [batch_for_step(run, run.cfg.seed, k) for k in range(args.steps + args.warmup + 1)]
        print(f"[{name}] JAX ...", file=sys.stderr, flush=True)
        j = bench_jax(run, batches, args.warmup)
        print(f"[{name}] oracle ...", file=sys.stderr, flush=True)
        o = bench_oracle(run, batches, args.warmup, args.torch_threads)
        rows.append({"config": name, "jax": j, "oracle": o, "ratio": j["steps_per_s"] / o["steps_per_s"]})

    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nsteady-state training steps/s, float32, {args.steps} timed steps after {args.warmup} warm-up steps; "
          f"cpu count {os.cpu_count()}, load avg {load1:.2f}, jax {jax.__version__} ({jax.default_backend()}), "
          f"torch threads {rows[0]['oracle']['threads'] if rows else '-'}")
    hdr = f"{'config':<14} {'JAX steps/s':>12} {'oracle steps/s':>15} {'JAX/oracle':>11} {'JAX compile s':>14}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['config']:<14} {r['jax']['steps_per_s']:>12.2f} {r['oracle']['steps_per_s']:>15.2f} "
              f"{r['ratio']:>10.2f}x {r['jax']['compile_s']:>14.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
