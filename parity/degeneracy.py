"""No degenerate parity case (SPEC S153). A case checks a term or a gradient only if that
term / gradient actually depends on what it is meant to test. Refused (by
`python -m parity.regen` before it writes a golden, and by parity/test_case_coverage.py for
every case) is a case in which, at step 0 of the oracle (after the faithfulness warmup):

- a term with draws of its own (stochastic sources, binomial noise, random PGD inits,
  routes) is unchanged when its draws are resampled from another key;
- a recon or importance-minimality term is unchanged when the components and the CI
  function are perturbed by a relative 1e-3 (its value is then a constant of the case, e.g.
  the target output identically zero after a final ReLU);
- a parameter group (components, CI function) or a persistent source bundle has an
  identically zero gradient: at step 0 for the parameters, at every step of the case for
  each source bundle (from the golden's trajectory records, `zero_gradient_groups`).

The oracle is used (no compile); the checks cost about one forward per case."""
from __future__ import annotations

import numpy as np

from contract.data import batch_for_step
from contract.draws import draw_plan, sample_numpy
from contract.init import init_state
from contract.metrics import term_key
from contract.resolve import ResolvedRun
from contract.runlog import with_dtype

RESAMPLE_STEP = 1_000_003  # another key of the contract's stream for the resampled draws
PERTURB = 1e-3  # relative size of the parameter perturbation
SAME_REL = 1e-13  # a term moving by less than this (relative) did not move


def _terms(run: ResolvedRun, init: dict, draws: dict, record: dict | None = None) -> dict[str, float]:
    from contract.backend import Probe
    from loop.backends import make_backend
    be = make_backend("torch", run)
    state, _ = be.faithfulness_warmup(be.new_state(init))
    batch = batch_for_step(run, run.cfg.seed, 0)
    return be.forward_terms(state, 0, batch, draws, None if record is None else Probe(record))


def _moved(a: float, b: float) -> bool:
    return abs(a - b) > SAME_REL * max(abs(a), abs(b), 1e-300)


def degeneracy_problems(run: ResolvedRun, init: dict[str, np.ndarray] | None = None) -> list[str]:
    """Why a case built on `run` (initial state `init`, default contract/init.py's) is
    degenerate at step 0 ([] if it is not)."""
    run = with_dtype(run, "float64")
    seed, plan = run.cfg.seed, draw_plan(run)
    init = init_state(run) if init is None else init
    draws = sample_numpy(plan, seed, 0)
    record: dict = {}
    base = _terms(run, init, draws, record)
    out: list[str] = []
    keys = {i: term_key(i, t) for i, t in enumerate(run.cfg.loss_terms)}
    # 1. draw dependence: a term's own draws are t<index>.*; binomial noise belongs to every
    # stochastic term
    other = sample_numpy(plan, seed, RESAMPLE_STEP)
    resampled = _terms(run, init, other)
    for t in run.recon_terms:
        own = [d.name for d in plan if d.name.startswith(f"t{t.index}.")]
        if t.source == "stochastic" and run.cfg.sampling == "binomial":
            own += [d.name for d in plan if d.name.startswith("binomial.")]
        k = keys[t.index]
        if own and not _moved(base[k], resampled[k]):
            out.append(f"{k}: unchanged ({base[k]!r}) when its {len(own)} draws are resampled: "
                       "the term does not depend on its masks / sources")
    # 2. parameter dependence of every term but faithfulness (which only sees components)
    rng = np.random.default_rng(12345)
    pert = {n: (a * (1 + PERTURB * rng.standard_normal(a.shape)) if n.startswith(("components.", "ci_fn.")) else a)
            for n, a in init.items()}
    moved = _terms(run, pert, draws)
    for i, t in enumerate(run.cfg.loss_terms):
        k = keys[i]
        if t.type != "faithfulness" and not _moved(base[k], moved[k]):
            out.append(f"{k}: unchanged ({base[k]!r}) when the components and the CI function are perturbed "
                       f"by {PERTURB:g}: a constant of the case")
    # 3. step-0 gradients of the parameter groups and of each persistent term's sources
    groups: dict[str, float] = {}
    for n, g in record.items():
        if n.startswith("grad."):
            name = n[5:]
            grp = ".".join(name.split(".")[:2]) if name.startswith("sources.") else name.split(".")[0]
            groups[grp] = groups.get(grp, 0.0) + float(np.sum(np.asarray(g, np.float64) ** 2))
    for grp, sq in sorted(groups.items()):
        if sq == 0.0 and not grp.startswith("sources."):
            out.append(f"gradient of {grp} is identically zero at step 0")
    return out


def zero_gradient_groups(records: list[dict]) -> list[str]:
    """Gradient groups (components, ci_fn, each source bundle) whose gradient norm is exactly
    zero at every step of `records` (a trajectory's per-step metrics)."""
    norms: dict[str, list[float]] = {}
    for r in records:
        for k, v in r.items():
            if not k.startswith("grad_norm/"):
                continue
            name = k[len("grad_norm/"):]
            grp = ".".join(name.split(".")[:2]) if name.startswith("sources.") else name.split(".")[0]
            norms.setdefault(grp, []).append(abs(float(v)))
    return [f"gradient of {g} is exactly zero at all {len(records)} steps"
            for g, vs in sorted(norms.items()) if max(vs) == 0.0]
