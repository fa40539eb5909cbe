"""Benchmark the JAX trainer against the torch oracle (not a test).

    .venv/bin/python scripts/benchmark.py [--steps N] [--rounds R] [--configs tms_5-2 resid_mlp1 tiny_llama]
                                          [--warmup W] [--torch-threads T] [--json OUT]

For each config, in ONE process, both backends built with `loop.backends.make_backend` and
driven through the backend interface only: steady-state training steps per second of
`backend.train_step(state, k, batch)` on the production path (draws None: JAX samples them
inside the jitted step from fold_in(prng_key(seed), step), the oracle from a torch generator),
JAX timed with block_until_ready on the state and metrics; plus the JAX compile time (first
call = trace + compile + one step). Both run the config's own shapes in float32 from the same
initial state; numpy batches are made beforehand for both (the data stream is shared code, not
part of either trainer's step; their conversion to the framework is, as in the training loop).
The faithfulness warmup is skipped (it is not part of the steady state). The two are timed in
alternating rounds (a JAX block, then an oracle block, R times, each round continuing the
step count) so a slow spell of a noisy machine hits both; the table gives the best round of
each, their ratio JAX / oracle, and the range of the per-round ratios.
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
    from contract.config import parse_config
    from contract.config_file import load_config
    from contract.resolve import resolve_run

    d = load_config(REPO / "configs" / f"{name}.yaml").to_dict()
    d["runtime"]["dtype"] = "float32"
    d["steps"] = max(d["steps"], steps)  # schedules stay those of a real run
    return resolve_run(parse_config(d, name))


class Bench:
    """One backend's production `train_step` on pre-made numpy batches; `block(ks)` times steps ks."""

    def __init__(self, name: str, run, batches: list):
        from loop.backends import make_backend

        self.name, self.batches = name, batches
        self.backend = make_backend(name, run)
        self.state = self.backend.new_state()
        t = time.perf_counter()
        self.block([0])
        self.compile_s = time.perf_counter() - t  # JAX: trace + compile + one step

    def block(self, ks) -> float:
        t = time.perf_counter()
        for k in ks:
            self.state, self.m = self.backend.train_step(self.state, k, self.batches[k])
        if self.name == "jax":
            import jax
            jax.block_until_ready((self.state, self.m))
        return time.perf_counter() - t

    def loss(self) -> float:
        return self.backend.host_metrics(self.m)["loss/total"]


def bench(run, batches: list, warmup: int, rounds: int, steps: int, threads: int | None) -> dict:
    """Warm both up, then `rounds` rounds of (a JAX block, an oracle block) of `steps` steps each,
    alternating, so slow spells of a noisy machine hit both (round r runs the same step numbers
    on both). Steps/s per backend is the best round; the ratio is also given per round (its
    median is the robust one)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    j, o = Bench("jax", run, batches), Bench("torch", run, batches)
    ks = list(range(1, 1 + warmup))
    j.block(ks)
    o.block(ks)
    tj, to = [], []
    for r in range(rounds):
        timed = list(range(1 + warmup + r * steps, 1 + warmup + (r + 1) * steps))
        tj.append(j.block(timed))
        to.append(o.block(timed))
    n = steps
    ratios = sorted(b / a for a, b in zip(tj, to, strict=True))
    return {"jax": {"compile_s": j.compile_s, "steps": n, "seconds": tj, "steps_per_s": n / min(tj), "loss": j.loss()},
            "oracle": {"steps": n, "seconds": to, "steps_per_s": n / min(to), "loss": o.loss(),
                       "threads": torch.get_num_threads()},
            "ratio": (n / min(tj)) / (n / min(to)), "ratio_per_round": ratios,
            "ratio_median": ratios[len(ratios) // 2]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/benchmark.py", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round, backend and config")
    ap.add_argument("--rounds", type=int, default=3, help="alternating (JAX, oracle) timing rounds")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps after the first (compile) step")
    ap.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="config names under configs/")
    ap.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    import jax

    from contract.data import batch_for_step

    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        ap.error("--steps and --rounds must be >= 1, --warmup >= 0")
    rows = []
    for name in args.configs:
        n_steps = 1 + args.warmup + args.rounds * args.steps
        run = load(name, n_steps)
        batches = [batch_for_step(run, run.cfg.seed, k) for k in range(n_steps)]
        print(f"[{name}] JAX and oracle, {args.rounds} alternating rounds ...", file=sys.stderr, flush=True)
        rows.append({"config": name, **bench(run, batches, args.warmup, args.rounds, args.steps, args.torch_threads)})

    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nsteady-state training steps/s, float32: best of {args.rounds} alternating rounds of {args.steps} steps "
          f"after {args.warmup} warm-up steps; cpu count {os.cpu_count()}, load avg {load1:.2f}, "
          f"jax {jax.__version__} ({jax.default_backend()}), torch threads {rows[0]['oracle']['threads'] if rows else '-'}")
    hdr = (f"{'config':<14} {'JAX steps/s':>12} {'oracle steps/s':>15} {'JAX/oracle':>11} "
           f"{'per round (min-max)':>20} {'JAX compile s':>14}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        rr = r["ratio_per_round"]
        print(f"{r['config']:<14} {r['jax']['steps_per_s']:>12.2f} {r['oracle']['steps_per_s']:>15.2f} "
              f"{r['ratio']:>10.2f}x {f'{rr[0]:.2f}-{rr[-1]:.2f}x':>20} {r['jax']['compile_s']:>14.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
