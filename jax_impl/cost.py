"""XLA's own count of a compiled program's work, for the benchmark's cross-check of the
analytic model FLOPs (contract/flops.py, S121). JAX-only diagnostics, not part of a step."""
from __future__ import annotations

import math
import re

import numpy as np

_DEF = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]")
_DOT = re.compile(r"\s*(?:ROOT )?%[\w.\-]+ = \w+\[([\d,]*)\]\S* dot\(([^)]*)\).*?lhs_contracting_dims=\{([\d,]*)\}")


_COMP = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")
_CALLS = re.compile(r"calls=%([\w.\-]+)")


def op_dot_flops(hlo_text: str) -> dict[str, float]:
    """{instruction name: its matmul FLOPs} over an HLO module's text: a `dot` counts
    2 · (output elements) · (contracted size), a fusion the dots of the computation it calls;
    every other instruction 0 (absent)."""
    shapes: dict[str, list[int]] = {}
    for line in hlo_text.splitlines():
        m = _DEF.match(line)
        if m:
            shapes[m.group(1)] = [int(x) for x in m.group(2).split(",") if x]
    per_comp: dict[str, float] = {}
    own: dict[str, float] = {}
    calls: dict[str, str] = {}
    comp = ""
    for line in hlo_text.splitlines():
        c = _COMP.match(line)
        if c and line.rstrip().endswith("{"):
            comp = c.group(1)
            continue
        d = _DEF.match(line)
        if d is None:
            continue
        name = d.group(1)
        if " dot(" in line:
            m = _DOT.match(line)
            if m is None:
                raise ValueError(f"op_dot_flops: cannot read the dot {line.strip()[:160]!r}")
            out = [int(x) for x in m.group(1).split(",") if x]
            lhs = shapes[m.group(2).split(",")[0].strip().split(" ")[-1].lstrip("%")]
            f = 2.0 * math.prod(out) * math.prod(lhs[int(x)] for x in m.group(3).split(",") if x)
            own[name] = f
            per_comp[comp] = per_comp.get(comp, 0.0) + f
        elif " fusion(" in line:
            k = _CALLS.search(line)
            if k:
                calls[name] = k.group(1)
    out = dict(own)
    for name, callee in calls.items():
        if per_comp.get(callee):
            out[name] = per_comp[callee]
    return out


def hlo_dot_flops(hlo_text: str) -> float:
    """The matmul FLOPs an HLO module runs: 2 · (output elements) · (contracted size) summed
    over every `dot` of its text (fused computations included)."""
    shapes = {}
    for line in hlo_text.splitlines():
        m = _DEF.match(line)
        if m:
            shapes[m.group(1)] = [int(x) for x in m.group(2).split(",") if x]
    total = 0.0
    for line in hlo_text.splitlines():
        if " dot(" not in line:
            continue
        m = _DOT.match(line)
        if m is None:
            raise ValueError(f"hlo_dot_flops: cannot read the dot {line.strip()[:160]!r}")
        out = [int(x) for x in m.group(1).split(",") if x]
        lhs = shapes[m.group(2).split(",")[0].strip().split(" ")[-1].lstrip("%")]
        k = math.prod(lhs[int(d)] for d in m.group(3).split(",") if d)
        total += 2.0 * math.prod(out) * k
    return total


def program_cost(lowered, compiled) -> dict[str, float]:
    """`flops` (XLA's cost analysis of the optimised program: elementwise work counted once per
    fused use), `flops_unoptimised` (of the program as traced), `dot_flops` (hlo_dot_flops of
    the optimised program), `bytes_accessed`, and the memory analysis in bytes (`argument`,
    `output`, `temp`, `alias`, `peak` = argument + output + temp - alias)."""
    def first(ca):
        return ca[0] if isinstance(ca, list | tuple) else ca

    ca, cl = first(compiled.cost_analysis()), first(lowered.cost_analysis())
    ma = compiled.memory_analysis()
    mem = {k: float(getattr(ma, f"{k}_size_in_bytes", 0) or 0) for k in ("argument", "output", "temp", "alias")}
    return {"flops": float(ca.get("flops", 0.0)), "flops_unoptimised": float(cl.get("flops", 0.0)),
            "dot_flops": hlo_dot_flops(compiled.as_text()), "bytes_accessed": float(ca.get("bytes accessed", 0.0)),
            **mem, "peak": mem["argument"] + mem["output"] + mem["temp"] - mem["alias"]}


def step_cost(backend, state, step: int, batch: np.ndarray) -> dict[str, float]:
    """`program_cost` of the production step of a `jax_impl.backend.JaxBackend` (its jitted
    `Stepper` lowered and compiled for these arguments; nothing runs, nothing is donated)."""
    lowered = backend.stepper.lower_key_step(state, backend.batch(batch), step)
    return program_cost(lowered, lowered.compile())
