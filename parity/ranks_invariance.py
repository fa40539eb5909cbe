"""Rank invariance of the oracle (SPEC S108-S112): the same case on 1, 2 or 4 data ranks
must be the same function. The tool people reach for when the sharded oracle disagrees
with itself.

    python -m parity.ranks_invariance compare CASE [CASE ...] --worlds 1 2 4 [--precision float64]
                                              [--steps 20] [--trap NAME]

runs every world size in its own subprocess (world 1 plain, world N > 1 under torchrun),
each case fed the identical initial state, batches and draws of the parity harness (global
arrays: each rank takes its rows), and prints, per case and world size, the worst relative
error against world 1 and the first divergence (step, metric or tensor).

Cases (`RANK_CASES`) are parity trajectory configs at 20 steps with a batch every world
size divides. `--trap` applies one deliberate wrong reduction inside the worker (never in
the product code) to show the check catches it: `per_rank_log` (importance minimality from
each rank's own sums), `summed_grads` (FSDP2 sums instead of averaging the gradients),
`per_rank_source` (shared-scope PGD sources ascend on each rank's own gradient)."""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from contract.targets import REPO_ROOT
from parity.cases import CASES, TMS_SMALL, TRAJ_OPTIM, Case

STEPS = 20
TRAPS = ("per_rank_log", "summed_grads", "per_rank_source")
TIMEOUT_S = 600  # one subprocess (all cases of one world size)


def _rank_cases() -> dict[str, Case]:
    """One case per target, persistent PGD (shared c / nsc and per-position bsc scopes) and
    fresh PGD (bsc / c / bc), 20 steps, batches divisible by 4."""
    out = {}
    # seed 3 for the persistent-PGD case: at seed 0 two of its bundles get an identically zero
    # gradient on the TMS batch (their sources never move, so no world size could differ)
    special = {"llama": {"batch_size": 4}, "tms_ppgd": {"seed": 3}}
    for name in ("tms", "resid", "llama", "tms_ppgd"):
        c = CASES[f"traj_{name}.64"]
        over = c.overrides | special.get(name, {})
        out[f"ranks_{name}"] = replace(c, name=f"ranks_{name}", steps=STEPS, overrides=over)
    fresh = CASES["tms_fresh_pgd"]
    out["ranks_fresh_pgd"] = replace(fresh, name="ranks_fresh_pgd", steps=STEPS,
                                     overrides=fresh.overrides | TMS_SMALL | TRAJ_OPTIM)
    return out


RANK_CASES = _rank_cases()


def case_run(name: str, precision: str, world: int):
    """The resolved run of a rank case at `precision` on `world` data ranks."""
    from contract.config import parse_config
    from contract.resolve import resolve_run
    c = RANK_CASES[name] if name in RANK_CASES else CASES[name]  # a rank case, or a parity case
    d = c.config_dict()
    d["runtime"] = {"dtype": precision, "mesh": {"data": world}}
    return resolve_run(parse_config(d, f"rank case {name}"))


# ------------------------------------------------------------------ the worker (one per rank)
def _trap(trap: str | None):
    """A context in which one deliberate wrong reduction replaces the right one (patched in
    this worker process, never in the product code); no trap: nothing changes."""
    if trap is None:
        return contextlib.nullcontext()
    from unittest import mock

    import oracle_torch.backend as be
    import oracle_torch.state as st
    import oracle_torch.train as tr
    from oracle_torch.ranks import ONE, Ranks
    if trap == "per_rank_log":
        right = tr.importance_minimality
        return mock.patch.object(tr, "importance_minimality",
                                 lambda run, u, p, beta, eps, ranks=ONE: right(run, u, p, beta, eps, ONE))
    if trap == "summed_grads":
        def summing(run, arrays, dtype, ranks=ONE):
            state = st.make_state(run, arrays, dtype, ranks)
            if state.module is not None:
                state.module.set_gradient_divide_factor(1.0)  # type: ignore[attr-defined]  # FSDPModule
            return state
        return mock.patch.object(be, "make_state", summing)
    if trap == "per_rank_source":
        right_grad = Ranks.source_grad
        return mock.patch.object(Ranks, "source_grad", lambda self, g, per_position: (
            g / self.world if self.sharded else right_grad(self, g, per_position)))
    raise ValueError(f"--trap: {trap!r} is not one of {', '.join(TRAPS)}")


def result_file(out: Path, name: str, precision: str, trap: str | None = None) -> Path:
    return out / f"{name}.{precision}{'.' + trap if trap else ''}.pkl"


def worker(names: list[str], precisions: list[str], world: int, steps: int, out: Path, traps: list[str | None]) -> None:
    """Run every (trap, precision, case) as this rank; rank 0 writes each result to a file."""
    import torch

    from contract.backend import Probe
    from loop.backends import make_backend
    from parity.runners import make_inputs

    torch.set_num_threads(1)
    backends, state = [], None
    for trap, precision, name in ((t, p, n) for t in traps for p in precisions for n in names):
        with _trap(trap):
            run = case_run(name, precision, world)
            inp = make_inputs(run, precision, steps)
            be = make_backend("torch", run)
            backends.append(be)
            state, warm = be.faithfulness_warmup(be.new_state(inp.init))
            records, grads0 = [], {}
            for k in range(steps):
                rec: dict | None = {} if k == 0 else None
                state, m = be.train_step(state, k, inp.batches[k], inp.draws[k], None if rec is None else Probe(rec))
                records.append(be.host_metrics(m))
                if rec is not None:
                    grads0 = {n[5:]: np.asarray(v) for n, v in rec.items() if n.startswith("grad.")}
            final = be.export_state(state)
        if be.primary:
            with open(result_file(out, name, precision, trap), "wb") as f:
                pickle.dump({"records": records, "grads0": grads0, "warmup": list(warm), "final": final}, f)
    # the end of a rank: every FSDP state freed while the process group lives, then the group
    # left once, by every rank together; the process then ends without interpreter
    # finalisation (main: os._exit), where torch's gloo teardown can abort a rank whose
    # results are already written
    last = backends.pop()
    del backends, state
    gc.collect()
    print(f"rank {last.ranks.rank}: {len(traps) * len(names) * len(precisions)} case(s) written, leaving",
          file=sys.stderr, flush=True)
    last.close()


# ------------------------------------------------------------------ the driver
def run_world(names: list[str], precisions: list[str], world: int, out: Path, steps: int = STEPS,
              timeout: float = TIMEOUT_S) -> dict[tuple[str, str], dict]:
    """Run the cases in each precision on `world` ranks in one subprocess; {(case, precision):
    result}. A failure (or a timeout) raises RuntimeError naming the rank (see `_launch`)."""
    _launch(names, precisions, world, out, steps, [], timeout)
    return {(n, p): _load(result_file(out, n, p)) for n in names for p in precisions}


def run_traps(name: str, precision: str, world: int, out: Path, traps: list[str], steps: int = 1,
              timeout: float = TIMEOUT_S) -> dict[str, dict]:
    """Run one case under each trap (one after the other, in one subprocess); {trap: result}."""
    _launch([name], [precision], world, out, steps, traps, timeout)
    return {t: _load(result_file(out, name, precision, t)) for t in traps}


def _launch(names, precisions, world: int, out: Path, steps: int, traps: list[str], timeout: float) -> None:
    """The worker on `world` ranks (world 1: plain, else under torchrun). On a failure or a
    timeout: RuntimeError with the ranks' fatal lines and the tail of their output (each line
    prefixed with its rank), the whole output kept in `out`/ranks.log."""
    out.mkdir(parents=True, exist_ok=True)
    args = ["-m", "parity.ranks_invariance", "worker", *names, "--precision", *precisions, "--world", str(world),
            "--steps", str(steps), "--out", str(out)] + (["--trap", *traps] if traps else [])
    if world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               "--max-restarts=0", "--monitor-interval=0.2", "--tee=3", *args]
    else:
        cmd = [sys.executable, *args]
    env = os.environ | {"OMP_NUM_THREADS": "1", "VPD_DIST_TIMEOUT_S": "120", "PYTHONPATH": str(REPO_ROOT),
                        "PYTHONFAULTHANDLER": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    log = out / "ranks.log"
    try:
        p = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        text, why = _text(e.stdout) + _text(e.stderr), f"no result after {timeout:.0f} s (a rank hung?)"
    else:
        if p.returncode == 0:
            return
        text, why = p.stdout + p.stderr, f"exit code {p.returncode}"
    log.write_text(text)
    fatal = [ln for ln in text.splitlines() if "Fatal Python error" in ln or "terminate called" in ln]
    raise RuntimeError(f"world {world}: {why}; whole output in {log}\n" + "\n".join(fatal[:8]) + "\n" + _tail(text))


def _load(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f)


def _text(text) -> str:
    return text.decode(errors="replace") if isinstance(text, bytes) else (text or "")


def _tail(text, n: int = 40) -> str:
    return "\n".join(_text(text).splitlines()[-n:])


@dataclass
class Worst:
    """The worst relative error of one group of values, and where the first excess is."""
    err: float = 0.0
    where: str = ""
    first_bad: str = ""


def rel(a, b) -> float:
    """max |a - b| / max |a|: relative to the reference tensor's magnitude (a scalar: to itself)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    scale = float(np.max(np.abs(a))) if a.size else 0.0
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    return diff / scale if scale > 0 else diff


def compare(ref: dict, got: dict, tol_step0: float, tol_traj: float) -> dict[str, Worst]:
    """World N (`got`) against world 1 (`ref`): step 0 (every loss term and every gradient
    leaf) within `tol_step0`, every step's losses and every final state leaf within `tol_traj`.
    Keys must match exactly (a missing metric or leaf is a failure)."""
    out = {"step0": Worst(), "trajectory": Worst(), "final": Worst()}

    def note(group: str, err: float, where: str, tol: float):
        w = out[group]
        if err > w.err:
            w.err, w.where = err, where
        if err > tol and not w.first_bad:
            w.first_bad = f"{where}: rel {err:.2e} > {tol:.0e}"

    for k, (ra, rb) in enumerate(zip(ref["records"], got["records"], strict=True)):
        if set(ra) != set(rb):
            note("trajectory", float("inf"), f"step {k} metric names {sorted(set(ra) ^ set(rb))[:3]}", tol_traj)
        for n in ra:
            if n.startswith("loss/"):
                note("step0" if k == 0 else "trajectory", rel(ra[n], rb.get(n, np.nan)), f"step {k} {n}",
                     tol_step0 if k == 0 else tol_traj)
    for n in sorted(set(ref["grads0"]) | set(got["grads0"])):
        note("step0", rel(ref["grads0"].get(n, np.nan), got["grads0"].get(n, np.nan)), f"step 0 gradient {n}", tol_step0)
    for n in sorted(set(ref["final"]) | set(got["final"])):
        note("final", rel(ref["final"].get(n, np.nan), got["final"].get(n, np.nan)), f"final {n}", tol_traj)
    return out


def first_divergence(worst: dict[str, Worst]) -> str | None:
    """The first excess, in the order step 0, trajectory, final state; None when none."""
    for group in ("step0", "trajectory", "final"):
        if worst[group].first_bad:
            return f"first divergence at {worst[group].first_bad}"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity.ranks_invariance", description=(__doc__ or "").split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker", help="(internal) run cases as one rank")
    w.add_argument("cases", nargs="+")
    w.add_argument("--precision", nargs="+", default=["float64"])
    w.add_argument("--world", type=int, required=True)
    w.add_argument("--steps", type=int, default=STEPS)
    w.add_argument("--out", type=Path, required=True)
    w.add_argument("--trap", nargs="+", choices=TRAPS, default=[], help="run every case under each trap instead")
    c = sub.add_parser("compare", help="run world sizes and compare each with world 1")
    c.add_argument("cases", nargs="+", choices=sorted(RANK_CASES))
    c.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    c.add_argument("--precision", default="float64", choices=["float64", "float32"])
    c.add_argument("--steps", type=int, default=STEPS)
    c.add_argument("--trap", choices=TRAPS)
    c.add_argument("--out", type=Path, default=Path("ranks_invariance"))
    a = ap.parse_args(argv)
    if a.cmd == "worker":
        worker(a.cases, a.precision, a.world, a.steps, a.out, a.trap or [None])
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # results written and the group left: nothing is lost by skipping finalisation
    from parity.tolerances import tol
    t0, tt = tol(a.precision, "ranks_step0").rel, tol(a.precision, "ranks_trajectory").rel
    ref = run_world(a.cases, [a.precision], 1, a.out / "world1", a.steps)
    bad = 0
    for world in a.worlds:
        out = a.out / f"world{world}{'-' + a.trap if a.trap else ''}"
        _launch(a.cases, [a.precision], world, out, a.steps, [a.trap] if a.trap else [], TIMEOUT_S)
        for name in a.cases:
            worst = compare(ref[(name, a.precision)], _load(result_file(out, name, a.precision, a.trap)), t0, tt)
            msg = first_divergence(worst)
            bad += msg is not None
            cells = "  ".join(f"{g} {v.err:.1e}" for g, v in worst.items())
            print(f"{name:18s} world {world} {a.precision}: {cells}  {msg or 'OK'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
