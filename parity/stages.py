"""Stage bundles: when parity breaks, dump the named intermediates of one step from each
backend and compare them stage by stage.

  python -m parity.stages dump --case NAME --backend torch|jax --out FILE.safetensors
        [--step K] [--pin BUNDLE --pin-stages ci_lower,ci_upper,route,mask,draws]
  python -m parity.stages compare A.safetensors B.safetensors

A bundle is a safetensors file: tensors named `<stage>.<detail>` plus metadata (case,
backend, step, precision, resolved config). Stages in pipeline order: draw, clean_out,
site_input, ci_logits, ci_lower, ci_upper, route, mask, masked_out, term, grad (`grad.<leaf>`
of the total before clipping, and `grad.sources.<bundle>.<site>` of each persistent-PGD term
with respect to its sources). Both backends are driven through the backend interface
(`make_backend`, `Backend.train_step` with a `Probe`), so the recorded step is the training
step itself, persistent sources and adversary warmup included. Pinning
feeds chosen stages of another bundle back in (pinned tensors are constants: no gradient
flows through a pinned CI value), so a divergence can be bisected stage by stage.
Two bundles of the same backend and precision compare by sha256 of the bytes (exact)."""
from __future__ import annotations

import argparse
import hashlib
import json
import sys

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from parity.cases import CASES
from parity.goldens import rel_err
from parity.tolerances import tol

STAGES = ["draw", "clean_out", "site_input", "ci_logits", "ci_lower", "ci_upper", "route", "mask",
          "masked_out", "term", "grad"]
PINNABLE = ["ci_lower", "ci_upper", "route", "mask", "draws"]


def stage_of(name: str) -> str:
    return name.split(".", 1)[0]


def _step_inputs(case_name: str, step: int):
    case = CASES[case_name]
    inp = case.inputs(step + 1)
    return case, inp


def dump(case_name: str, backend_name: str, step: int = 0, pins: dict | None = None) -> dict[str, np.ndarray]:
    """Run backend `backend_name` ("torch" | "jax") through the backend interface on the
    harness's inputs (faithfulness warmup, then steps 0..step-1 with the draw plan's arrays)
    and record training step `step` with a probe: every intermediate, `term.*`, `grad.<leaf>`
    and, for persistent-PGD terms, `grad.sources.<bundle>.<site>`. `pins` (from
    `pins_from_bundle`) replace stages of the recorded step; `pins["draws"]` its draws.
    JAX float64 needs jax_enable_x64 set before JAX computes (the CLI sets it)."""
    from contract.backend import Probe
    from loop.backends import make_backend

    if backend_name == "torch":
        import torch
        torch.set_num_threads(1)  # as parity/runners.py: one thread, reproducible timings and sums
    case, inp = _step_inputs(case_name, step)
    backend = make_backend(backend_name, inp.run)  # case.run() carries runtime.dtype = case.precision
    try:
        state, _ = backend.faithfulness_warmup(backend.new_state(inp.init))
        for k in range(step):
            state, _ = backend.train_step(state, k, inp.batches[k], inp.draws[k])
        pins = dict(pins or {})
        draws = pins.pop("draws", None) or inp.draws[step]
        record: dict = {}
        backend.train_step(state, step, inp.batches[step], draws, Probe(record, pins))
    finally:
        backend.close()
    out = {f"draw.{n}": np.asarray(a) for n, a in draws.items()}
    out |= {n: np.asarray(v) for n, v in record.items()}
    return out


def write_bundle(path: str, tensors: dict[str, np.ndarray], meta: dict):
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path,
              metadata={"vpd_stage_bundle": json.dumps(meta)})


def read_bundle(path: str) -> tuple[dict[str, np.ndarray], dict]:
    with safe_open(path, "np") as f:
        meta = json.loads((f.metadata() or {}).get("vpd_stage_bundle", "{}"))
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def pins_from_bundle(path: str, stages: list[str]) -> dict:
    bad = [s for s in stages if s not in PINNABLE]
    if bad:
        raise ValueError(f"--pin-stages: {bad} cannot be pinned; pinnable: {PINNABLE}")
    tensors, _ = read_bundle(path)
    pins: dict = {}
    for name, v in tensors.items():
        st = stage_of(name)
        if st == "draw" and "draws" in stages:
            pins.setdefault("draws", {})[name[len("draw."):]] = v
        elif st in stages and st != "draw":
            pins[name] = v
    return pins


def compare_bundles(a: dict, b: dict, precision: str, exact: bool) -> tuple[list[tuple], int | None]:
    """Rows (stage, name, max_abs, rel, allowed, status); index of the first failing row."""
    rows = []
    t_val, t_grad = tol(precision, "term"), tol(precision, "grad")
    order = {s: i for i, s in enumerate(STAGES)}
    for name in sorted(set(a) | set(b), key=lambda n: (order.get(stage_of(n), 99), n)):
        st = stage_of(name)
        if name not in a or name not in b:
            rows.append((st, name, None, None, None, f"MISSING in {'A' if name not in a else 'B'}"))
            continue
        x, y = np.asarray(a[name]), np.asarray(b[name])
        if x.shape != y.shape:
            rows.append((st, name, None, None, None, f"SHAPE {x.shape} vs {y.shape}"))
            continue
        if exact:
            same = hashlib.sha256(x.tobytes()).digest() == hashlib.sha256(y.tobytes()).digest()
            rows.append((st, name, None, None, 0.0, "IDENTICAL" if same else "BYTES DIFFER"))
            continue
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        mabs = float(np.abs(x64 - y64).max()) if x.size else 0.0
        if st == "grad":
            scale = max(float(np.linalg.norm(x64)), float(np.linalg.norm(y64)))
            rel, allowed = (0.0 if scale == 0 else mabs / scale), t_grad.rel
        else:
            scale = max(float(np.abs(x64).max()) if x.size else 0.0, float(np.abs(y64).max()) if y.size else 0.0)
            rel, allowed = rel_err(0.0, mabs, 1.0) if scale == 0 else mabs / max(scale, t_val.floor), t_val.rel
        rows.append((st, name, mabs, rel, allowed, "ok" if rel <= allowed else "FAIL"))
    first = next((i for i, r in enumerate(rows) if r[5] not in ("ok", "IDENTICAL")), None)
    return rows, first


def print_table(rows, first, out=None):
    out = out or sys.stdout  # resolved per call, so redirected stdout (capsys, redirect_stdout) sees the table
    print(f"{'stage':11s} {'tensor':60s} {'max|diff|':>10s} {'rel':>9s} {'allowed':>8s}  status", file=out)
    for i, (st, name, mabs, rel, allowed, status) in enumerate(rows):
        mark = "  <-- first failure" if i == first else ""
        f = lambda v: "-" if v is None else f"{v:.2e}"
        print(f"{st:11s} {name[:60]:60s} {f(mabs):>10s} {f(rel):>9s} {f(allowed):>8s}  {status}{mark}", file=out)
    print("all stages agree" if first is None else f"first failing stage: {rows[first][0]} ({rows[first][1]})", file=out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity.stages", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump", help="dump one step's intermediates of one backend")
    d.add_argument("--case", required=True, choices=sorted(CASES))
    d.add_argument("--backend", required=True, choices=["torch", "jax"])
    d.add_argument("--out", required=True)
    d.add_argument("--step", type=int, default=0)
    d.add_argument("--pin", help="bundle whose stages are fed back in")
    d.add_argument("--pin-stages", default="", help=f"comma list of {PINNABLE}")
    c = sub.add_parser("compare", help="stage table of two bundles")
    c.add_argument("a")
    c.add_argument("b")
    a = ap.parse_args(argv)
    if a.cmd == "dump":
        if a.backend == "jax" and CASES[a.case].precision == "float64":
            import jax
            jax.config.update("jax_enable_x64", True)
        pins = pins_from_bundle(a.pin, [s for s in a.pin_stages.split(",") if s]) if a.pin else None
        tensors = dump(a.case, a.backend, a.step, pins)
        meta = {"case": a.case, "backend": a.backend, "step": a.step, "precision": CASES[a.case].precision,
                "pinned": a.pin_stages.split(",") if a.pin else [], "config": CASES[a.case].cfg().to_dict()}
        write_bundle(a.out, tensors, meta)
        print(f"wrote {len(tensors)} tensors to {a.out}")
        return 0
    ta, ma = read_bundle(a.a)
    tb, mb = read_bundle(a.b)
    exact = ma.get("backend") == mb.get("backend") and ma.get("precision") == mb.get("precision") and not (ma.get("pinned") or mb.get("pinned"))
    rows, first = compare_bundles(ta, tb, ma.get("precision", "float32"), exact)
    print(f"A: {a.a} ({ma.get('backend')}, {ma.get('precision')})  B: {a.b} ({mb.get('backend')}, {mb.get('precision')})"
          + ("  [exact: sha256]" if exact else ""))
    print_table(rows, first)
    return 0 if first is None else 1


if __name__ == "__main__":
    sys.exit(main())
