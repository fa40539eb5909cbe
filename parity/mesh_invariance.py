"""Mesh invariance of the JAX trainer (SPEC S142, S143): the same run on every
(data, components) mesh and on several processes equals the one-device run.

    python -m parity.mesh_invariance [--exhaustive] [--steps N] [--configs NAME ...]

Each config (built from a parity case with every site's C = 8 and batch 8, so every mesh
divides it) runs in one subprocess per device count (the count is fixed before JAX starts):
the reference (1, 1) in a one-device process, every other mesh in an 8-device process, and
the (2, 2) mesh as 2 processes x 2 devices (jax.distributed over gloo). Per config, mesh and
dtype it compares with the reference:
- step 0 (contract draws, the parity harness's): every loss term and every gradient leaf
  (elementwise, relative to the leaf's norm);
- a trajectory of N steps with contract draws (every logged metric);
- a trajectory of production steps (draws sampled inside the step from the seed's key: the
  generator must give the same stream on every mesh, S143).
It prints the table (config x mesh x dtype -> worst relative error) and the worst error per
part against the `mesh_*` tolerances of parity/tolerances.py. The default set is the one the
test suite runs (tests/test_jax_mesh_invariance.py); --exhaustive runs every config, mesh and
dtype."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from contract.targets import REPO_ROOT

MESHES = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2), (1, 4)]
PROCESSES = (2, (2, 2))  # 2 processes x 2 devices, mesh (2, 2)
TWO_PROCESSES = "2 proc (2,2)"
# name -> (parity case, what it covers)
CONFIGS = {
    "tms_stoch_beta": ("traj_tms.64", "TMS, stochastic recon (all, layerwise), imp-min with beta"),
    "resid_subset": ("traj_resid.64", "ResidMLP, vector_mlp CI, stochastic recon subset routing"),
    "llama_subset": ("traj_llama.64", "Llama, shared_mlp CI, stochastic recon subset, imp-min beta"),
    "tms_fresh_pgd": ("tms_fresh_pgd", "TMS, fresh PGD (bsc, c, bc scopes)"),
    "tms_ppgd": ("traj_tms_ppgd.64", "TMS, persistent PGD (c shared, nsc, bsc per-position scopes)"),
    "llama_ppgd": ("traj_llama_ppgd.64", "Llama, persistent PGD (sc shared, nsc)"),
    "tms_global_mlp": ("tms_global_mlp", "TMS, global_shared_mlp CI (output layer over C)"),
    "tms_transformer": ("tms_transformer", "TMS, global_shared_transformer CI"),
}
DEFAULT = {"configs": ["tms_ppgd"], "meshes": [(2, 2), (1, 4)], "dtypes": ["float64"],
           "processes": ["tms_ppgd"]}
TIMEOUT = int(os.environ.get("VPD_MESH_TIMEOUT", "900"))  # s per subprocess


def config_dict(name: str, dtype: str, mesh: tuple[int, int]) -> dict:
    from parity.cases import CASES
    d = CASES[CONFIGS[name][0]].config_dict()
    for s in d["sites"]:
        s["C"] = 8
    d["batch_size"] = 8
    d["eval"] = dict(d.get("eval") or {}, batch_size=8)
    for t in d["loss_terms"]:
        if t["type"] == "importance_minimality":
            t["beta"] = 0.5
    d["runtime"] = dict(d.get("runtime") or {}, dtype=dtype, mesh={"data": mesh[0], "components": mesh[1]})
    return d


# ------------------------------------------------------------------ one process: run jobs
def run_job(name: str, dtype: str, mesh: tuple[int, int], steps: int, prod_steps: int) -> dict:
    import numpy as np

    from contract.backend import Probe
    from contract.config import parse_config
    from contract.data import batch_for_step
    from contract.resolve import resolve_run
    from loop.backends import make_backend
    from parity.runners import make_inputs

    run = resolve_run(parse_config(config_dict(name, dtype, mesh)))
    inp = make_inputs(run, dtype, steps)
    be = make_backend("jax", run)
    state, _ = be.faithfulness_warmup(be.new_state(inp.init))
    record: dict = {}
    terms = be.forward_terms(state, 0, inp.batches[0], inp.draws[0], Probe(record))
    grads = {k[5:]: np.asarray(v).tolist() for k, v in record.items() if k.startswith("grad.")}
    traj = []
    for k, (b, d) in enumerate(zip(inp.batches, inp.draws, strict=True)):
        state, m = be.train_step(state, k, b, d)
        traj.append(be.host_metrics(m))
    prod = []
    state, _ = be.faithfulness_warmup(be.new_state(inp.init))
    for k in range(prod_steps):
        state, m = be.train_step(state, k, batch_for_step(run, run.cfg.seed, k))
        m.pop("guard/finite", None)
        prod.append(be.host_metrics(m))
    return {"terms": terms, "grads": grads, "traj": traj, "prod": prod}


def worker(spec: dict) -> None:
    import jax
    out = {}
    for name, dtype, mesh in spec["jobs"]:
        out[f"{name}|{dtype}|{mesh[0]},{mesh[1]}"] = run_job(name, dtype, tuple(mesh), spec["steps"], spec["prod_steps"])
    if jax.process_index() == 0:
        print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------ the driver
def _env(devices: int) -> dict:
    env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT), WANDB_MODE="disabled",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_NUM_CPU_DEVICES"):
        env.pop(k, None)
    return env


def _result(out: str) -> dict:
    lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):])


def run_devices(devices: int, spec: dict) -> dict:
    """The jobs in one process with `devices` simulated CPU devices."""
    p = subprocess.run([sys.executable, "-m", "parity.mesh_invariance", "worker", json.dumps(spec)], env=_env(devices),
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    if p.returncode != 0:
        raise RuntimeError(f"the {devices}-device process failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return _result(p.stdout)


def run_processes(n: int, per: int, spec: dict) -> dict:
    """The jobs as `n` processes of `per` devices each (jax.distributed); a process that fails
    stops the others and is named. Their output goes to files, not pipes: a RESULT line larger
    than a pipe's buffer, unread until every process ends, kept process 0 from reaching JAX's
    shutdown barrier, and process 1 aborted there after the shutdown timeout."""
    import tempfile

    from jax_impl.launch import _free_port, child_env
    addr = f"127.0.0.1:{_free_port()}"
    base = _env(per)
    procs, files = [], []
    try:
        for i in range(n):
            env = dict(base)
            env.update(child_env(n * per, n, i, addr))
            env["JAX_ENABLE_X64"] = "1"
            out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            files.append((out, err))
            procs.append(subprocess.Popen([sys.executable, "-m", "parity.mesh_invariance", "worker", json.dumps(spec)],
                                          env={**env, **{k: base[k] for k in ("PYTHONPATH",)}}, cwd=REPO_ROOT,
                                          stdout=out, stderr=err, text=True))

        def text(i: int, which: int) -> str:
            f = files[i][which]
            f.seek(0)
            return f.read()

        deadline = time.monotonic() + TIMEOUT
        while any(p.poll() is None for p in procs):
            bad = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode not in (None, 0)]
            if bad or time.monotonic() > deadline:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
                if bad:
                    i, code = bad[0]
                    raise RuntimeError(f"process {i} of {n} failed (exit {code}):\n{text(i, 1)[-3000:]}")
                raise RuntimeError(f"the {n} processes did not finish within {TIMEOUT} s (alive: "
                                   f"{[i for i, p in enumerate(procs) if p.returncode is None]})")
            time.sleep(0.2)
        for i, p in enumerate(procs):
            if p.returncode != 0:
                raise RuntimeError(f"process {i} of {n} failed (exit {p.returncode}):\n{text(i, 1)[-3000:]}")
        return _result(text(0, 0))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for out, err in files:
            out.close()
            err.close()


def rel(a: float, b: float, floor: float = 1e-12) -> float:
    return abs(a - b) / max(abs(a), abs(b), floor)


def compare(ref: dict, got: dict) -> dict[str, float]:
    """Worst relative errors of one job against the reference: step0 (terms, gradient leaves
    relative to the leaf's norm), traj (contract draws), prod (production draws)."""
    import numpy as np
    step0 = max(rel(ref["terms"][k], got["terms"][k]) for k in ref["terms"])
    assert set(ref["grads"]) == set(got["grads"]), set(ref["grads"]) ^ set(got["grads"])
    for k in ref["grads"]:
        a, b = np.asarray(ref["grads"][k]), np.asarray(got["grads"][k])
        step0 = max(step0, float(np.abs(a - b).max() / max(np.linalg.norm(a), 1e-300)))
    out = {"step0": step0}
    for part in ("traj", "prod"):
        worst = 0.0
        assert len(ref[part]) == len(got[part])
        for a, b in zip(ref[part], got[part], strict=True):
            assert set(a) == set(b), set(a) ^ set(b)
            worst = max([worst] + [rel(a[k], b[k]) for k in a])
        out[part] = worst
    return out


def table(configs: list[str], meshes: list[tuple[int, int]], dtypes: list[str], processes: list[str], steps: int,
          prod_steps: int, show=None) -> list[dict]:
    """Rows {config, mesh, dtype, step0, traj, prod} of every requested combination, config by
    config (`show(rows)` after each)."""
    rows = []
    for c in configs:
        rows += _table([c], meshes, dtypes, [p for p in processes if p == c], steps, prod_steps)
        if show is not None:
            show([r for r in rows if r["config"] == c])
    return rows


def _table(configs: list[str], meshes: list[tuple[int, int]], dtypes: list[str], processes: list[str], steps: int,
           prod_steps: int) -> list[dict]:
    spec = {"steps": steps, "prod_steps": prod_steps}
    ref = run_devices(1, spec | {"jobs": [(c, d, (1, 1)) for c in configs for d in dtypes]})
    by_dev: dict[int, list] = {}
    for m in meshes:
        by_dev.setdefault(8 if m[0] * m[1] > 1 else 1, []).extend((c, d, m) for c in configs for d in dtypes)
    got = {}
    for devices, jobs in by_dev.items():
        got |= run_devices(devices, spec | {"jobs": jobs})
    rows = []
    for c in configs:
        for d in dtypes:
            r = ref[f"{c}|{d}|1,1"]
            for m in meshes:
                rows.append({"config": c, "mesh": f"({m[0]},{m[1]})", "dtype": d} | compare(r, got[f"{c}|{d}|{m[0]},{m[1]}"]))
    if processes:
        n, mesh = PROCESSES
        jobs = [(c, d, mesh) for c in processes for d in dtypes]
        got = run_processes(n, mesh[0] * mesh[1] // n, spec | {"jobs": jobs})
        for c, d, m in jobs:
            rows.append({"config": c, "mesh": TWO_PROCESSES, "dtype": d}
                        | compare(ref[f"{c}|{d}|1,1"], got[f"{c}|{d}|{m[0]},{m[1]}"]))
    return rows


def limits(dtype: str) -> tuple[float, float]:
    """(step-0 limit, trajectory limit) of a dtype (parity/tolerances.py)."""
    from parity.tolerances import tol
    return tol(dtype, "mesh_step0").rel, tol(dtype, "mesh_trajectory").rel


def print_table(rows: list[dict], header: bool = True) -> None:
    if header:
        print(f"{'config':<16} {'mesh':<13} {'dtype':<8} {'step 0':>9} {'contract traj':>13} {'production':>10}  limits")
    for r in rows:
        s0, tr = limits(r["dtype"])
        print(f"{r['config']:<16} {r['mesh']:<13} {r['dtype']:<8} {r['step0']:9.1e} {r['traj']:13.1e} "
              f"{r['prod']:10.1e}  {s0:.0e} / {tr:.0e}", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "worker":
        worker(json.loads(argv[1]))
        return 0
    ap = argparse.ArgumentParser(prog="python -m parity.mesh_invariance", description="Mesh invariance of the JAX trainer (S142).")
    ap.add_argument("--exhaustive", action="store_true", help="every config, mesh and dtype (slow)")
    ap.add_argument("--configs", nargs="*", choices=list(CONFIGS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prod-steps", type=int, default=5)
    ap.add_argument("--dtypes", nargs="*", choices=["float64", "float32"])
    a = ap.parse_args(argv)
    if a.exhaustive:
        configs, meshes, dtypes, procs = list(CONFIGS), MESHES[1:], ["float64", "float32"], list(CONFIGS)
    else:
        configs, meshes, dtypes, procs = DEFAULT["configs"], DEFAULT["meshes"], DEFAULT["dtypes"], DEFAULT["processes"]
    if a.configs:
        configs, procs = a.configs, [c for c in procs if c in a.configs] or a.configs
    dtypes = a.dtypes or dtypes
    print_table([])
    rows = table(configs, meshes, dtypes, procs, a.steps, a.prod_steps, show=lambda rs: print_table(rs, header=False))
    bad = [r for r in rows if r["step0"] > limits(r["dtype"])[0] or max(r["traj"], r["prod"]) > limits(r["dtype"])[1]]
    for r in bad:
        print(f"FAIL {r}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
