"""Eval parity: the oracle and the JAX trainer evaluate the SAME state on the same eval batch
with the same eval draws, and every eval metric (`eval/l0/*`, `eval/<mse|kl|ce>/*`, and the
PGD probe `eval/pgd/*`, SPEC S88) agrees to the parity tolerance of its precision.

Driven through the backend interface only (`Backend.eval_metrics`: explicit eval draws, the
parity mode). The eval draws are sampled once with numpy from the oracle's `eval_draw_plan`
(keyed like the training draws by (seed, step, name)); the eval batch is eval-stream batch 0.
Two states per case, each fed to both backends through `new_state` so that the compared
quantity is the eval alone: the initial state (`contract/init.py`), and the oracle's state
after its faithfulness warmup and `N_STEPS` parity steps (exported, then loaded by both).

Tolerance: the "term" row of parity/tolerances.py. An eval metric is the same kind of
quantity as a step-0 loss term: a scalar reduction of forwards of one identical state on
identical inputs, with no optimizer step between the frameworks to amplify the
reassociation noise (so not the "trajectory" row). The PGD probe's sign ascents are
piecewise constant in the gradient: as for the fresh-PGD loss terms (checked at step 0 under
the same row), the frameworks take the same signs unless a gradient entry is within roundoff
of zero, which the cases here do not hit (a failure naming `eval/pgd/*` alone would point
there first; see SPEC S80/S84 notes).

Teeth: every PGD case also evaluates with the probe's initial sources tied to the
`stochastic` variant's draws (same mask, same delta mask), so `eval/<loss>/stochastic` is
the loss at the probe's starting point, and the probe must move it up (by `MIN_ASCENT`);
a probe that does not ascend, or ascends differently in JAX, fails here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest

from contract.data import batch_for_step
from contract.draws import bernoulli_from_uniform, sample_numpy
from contract.metrics import metric_order
from contract.resolve import ResolvedRun
from parity.cases import CASES, Case, deep_merge
from parity.goldens import Report, rel_err
from parity.runners import make_inputs
from parity.tolerances import tol

N_STEPS = 3  # parity steps of the oracle before the second evaluated state
MIN_ASCENT = 1.02  # the probe's loss must exceed the loss at its initial sources by >= 2%
EVAL_STEP = 0  # the numpy eval draws are keyed (seed, EVAL_STEP, name); the batch is eval batch 0

PGD = {"pgd_steps": 3, "pgd_step_size": 0.1}
NO_DELTA_BINOMIAL = {"use_delta_component": False, "sampling": "binomial"}


@dataclass(frozen=True)
class EvalCase:
    name: str
    base: str  # a case of parity/cases.py: config, precision, shapes, loss terms, optimizer
    overrides: dict
    why: str
    precision: str | None = None  # None: the base case's

    def case(self) -> Case:
        base = CASES[self.base]
        return dataclasses.replace(base, name=self.name, precision=self.precision or base.precision,
                                   overrides=deep_merge(base.overrides, self.overrides))


EVAL_CASES = {c.name: c for c in [
    EvalCase("resid2_pgd", "resid2_chunks", {"eval": {"batch_size": 32} | PGD},
             "toy mse: 2-layer ResidMLP, 4 sites, delta channel, continuous sampling, PGD probe"),
    EvalCase("resid_binomial_nodelta_pgd", "traj_resid.64",
             NO_DELTA_BINOMIAL | {"eval": {"batch_size": 32, "pgd_steps": 4, "pgd_step_size": 0.25}},
             "toy mse: no delta channel (C-channel probe sources), binomial stochastic variant"),
    EvalCase("tms_no_pgd", "traj_tms.64", {"eval": {"batch_size": 32}},
             "toy mse without the probe: no eval/pgd key, no pgd_init draw"),
    EvalCase("llama_pgd", "traj_llama.64", {"eval": {"batch_size": 2} | PGD},
             "llama kl/ce: GQA attention sites, per-position probe sources [B, T, C+1]"),
    EvalCase("resid2_pgd.32", "resid2_chunks", {"eval": {"batch_size": 32} | PGD},
             "float32 toy with the probe (the float32 'term' row)", "float32"),
    EvalCase("llama_pgd.32", "traj_llama.32", {"eval": {"batch_size": 2} | PGD},
             "float32 llama with the probe"),
]}


def _precision(ec: EvalCase) -> str:
    return ec.case().precision


# ------------------------------------------------------------------ inputs, once per case
_cache: dict = {}


def _backend(name: str, run: ResolvedRun, case: str):
    key = ("backend", name, case)
    if key not in _cache:
        from loop.backends import make_backend
        if name == "torch":
            import torch
            torch.set_num_threads(1)
        _cache[key] = make_backend(name, run)
    return _cache[key]


def eval_inputs(run: ResolvedRun) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The eval batch and the eval draws (numpy, sampled once from the oracle's eval draw plan)."""
    from contract.draws import eval_batch_shape, eval_draw_plan
    cfg = run.cfg
    batch = batch_for_step(run, cfg.seed, EVAL_STEP, batch=cfg.eval.batch_size, split="eval")
    return batch, sample_numpy(eval_draw_plan(run, eval_batch_shape(run)), cfg.seed, EVAL_STEP)


def tied_draws(run: ResolvedRun, draws: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`draws` with each site's probe init set to the `stochastic` variant's source and delta
    mask: then `eval/<loss>/stochastic` is the probe's loss at its initial sources."""
    out = dict(draws)
    for s in run.sites:
        u = draws[f"eval.{s.name}.source"]
        if run.cfg.sampling == "binomial":
            u = bernoulli_from_uniform(u)
        if run.cfg.use_delta_component:
            u = np.concatenate([u, draws[f"eval.{s.name}.delta"][..., None]], -1)
        assert u.shape == draws[f"eval.{s.name}.pgd_init"].shape, s.name
        out[f"eval.{s.name}.pgd_init"] = u
    return out


def states(ec: EvalCase) -> dict[str, dict[str, np.ndarray]]:
    """The evaluated states as flat arrays (contract/init.py names): the initial state, and the
    oracle's state after its faithfulness warmup and N_STEPS parity steps."""
    key = ("states", ec.name)
    if key not in _cache:
        case = ec.case()
        run = case.run()
        inp = make_inputs(run, case.precision, N_STEPS)
        oracle = _backend("torch", run, ec.name)
        st, _ = oracle.faithfulness_warmup(oracle.new_state(inp.init))
        for k in range(N_STEPS):
            st, _ = oracle.train_step(st, k, inp.batches[k], inp.draws[k])
        trained = {n: a for n, a in oracle.export_state(st).items() if n in inp.init}
        assert set(trained) == set(inp.init)
        _cache[key] = {"init": inp.init, f"step{N_STEPS}": trained}
    return _cache[key]


def metrics(backend: str, ec: EvalCase, state: str, tie: bool = False) -> dict[str, float]:
    key = ("metrics", backend, ec.name, state, tie)
    if key not in _cache:
        run = ec.case().run()
        batch, draws = eval_inputs(run)
        b = _backend(backend, run, ec.name)
        _cache[key] = b.eval_metrics(b.new_state(states(ec)[state]), batch, tied_draws(run, draws) if tie else draws)
    return _cache[key]


def expected_keys(run: ResolvedRun) -> set[str]:
    keys = {k for k in metric_order(run, []) if k.startswith("eval/")}
    return keys if run.cfg.eval.pgd_steps else {k for k in keys if not k.startswith("eval/pgd/")}


def kind(key: str) -> str:
    """eval/l0/<site> -> l0; eval/kl/ci -> kl; eval/pgd/mse -> pgd."""
    return key.split("/")[1]


def compare(label: str, precision: str, got: dict[str, float], want: dict[str, float]) -> Report:
    rep = Report(label)
    t = tol(precision, "term")
    if set(got) != set(want):
        rep.failures.append(f"keys differ: jax only {sorted(set(got) - set(want))}, oracle only {sorted(set(want) - set(got))}")
    for k in sorted(set(got) & set(want)):
        e = rel_err(got[k], want[k], t.floor)
        rep.note(kind(k), e, t.rel, k)
        if e > t.rel:
            rep.failures.append(f"{k}: jax {got[k]!r} vs oracle {want[k]!r} (rel err {e:.2e} > {t.rel:.1e})")
    return rep


# ------------------------------------------------------------------ tests
STATES = ("init", f"step{N_STEPS}")


def _params(names) -> list:
    return [pytest.param(n, s, marks=pytest.mark.xdist_group(f"eval.{n}")) for n in names for s in STATES]


PARAMS = _params(EVAL_CASES)
PGD_PARAMS = _params(n for n, ec in EVAL_CASES.items() if ec.case().cfg().eval.pgd_steps)


@pytest.mark.parametrize(("name", "state"), PARAMS)
def test_eval_jax_vs_oracle(name, state, record_property):
    ec = EVAL_CASES[name]
    run = ec.case().run()
    want = metrics("torch", ec, state)
    assert set(want) == expected_keys(run), sorted(set(want) ^ expected_keys(run))
    got = metrics("jax", ec, state)
    rep = compare(f"eval {name} {state} jax-vs-oracle", _precision(ec), got, want)
    cells = [f"{what} {e:.1e}/{a:.0e}" for what, (e, a, _) in rep.worst.items()]
    record_property("margins", f"{rep.label:40s} " + "  ".join(cells))
    assert rep.ok, rep.message()


@pytest.mark.parametrize(("name", "state"), PGD_PARAMS)
def test_pgd_probe_ascends_in_both(name, state, record_property):
    """S88 can be seen: with the probe's initial sources tied to the stochastic variant's draws,
    the probe's loss exceeds `eval/<loss>/stochastic` (its loss at the initial sources), in
    both backends, and the backends agree on both numbers."""
    ec = EVAL_CASES[name]
    run = ec.case().run()
    loss = "kl" if run.cfg.target.kind == "llama" else "mse"
    got, want = metrics("jax", ec, state, tie=True), metrics("torch", ec, state, tie=True)
    for who, m in (("oracle", want), ("jax", got)):
        start, probe = m[f"eval/{loss}/stochastic"], m[f"eval/pgd/{loss}"]
        assert probe > MIN_ASCENT * start, f"{who}: the probe did not ascend: {probe!r} vs {start!r} at its initial sources"
    rep = compare(f"eval {name} {state} tied jax-vs-oracle", _precision(ec), got, want)
    assert rep.ok, rep.message()


def test_eval_draw_plan_has_the_probe_draws_iff_the_probe_runs():
    """Both backends sample the one eval draw plan (contract/draws.py::eval_draw_plan): the
    probe's `pgd_init` draws are in it exactly when eval.pgd_steps > 0 (S88)."""
    from contract.draws import eval_batch_shape, eval_draw_plan
    for ec in EVAL_CASES.values():
        run = ec.case().run()
        want = eval_draw_plan(run, eval_batch_shape(run))
        names = [d.name for d in want]
        assert any(n.endswith(".pgd_init") for n in names) == bool(run.cfg.eval.pgd_steps), ec.name


@pytest.mark.xdist_group("eval.resid2_pgd")
def test_production_eval_reports_the_probe():
    """The loop's eval (`Backend.evaluate`: draws sampled by each backend, the JAX ones inside
    its jitted eval) reports the same keys in both backends, `eval/pgd/*` included, with
    finite values."""
    ec = EVAL_CASES["resid2_pgd"]
    run = ec.case().run()
    keys = []
    for name in ("torch", "jax"):
        b = _backend(name, run, ec.name)
        m = b.host_metrics(b.evaluate(b.new_state(states(ec)["init"]), 0))
        assert all(np.isfinite(v) for v in m.values()), (name, m)
        keys.append(set(m))
    assert keys[0] == keys[1] == expected_keys(run), keys
    assert "eval/pgd/mse" in keys[1]


EVAL_N_BATCHES = 3


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_loop_eval_is_the_mean_over_its_batches(backend):
    # guards S157: the loop's eval (`Backend.evaluate`) at step k over eval.n_batches batches is
    # the mean of the per-batch metrics of eval-stream batches k * n + j. Compared on the
    # metrics that do not depend on the eval draws (the loop samples those itself): L0 and the
    # ci / unmasked / rounded / zero variants.
    from contract.config import parse_config
    from contract.resolve import resolve_run
    from loop.backends import make_backend
    ec = EVAL_CASES["tms_no_pgd"]
    case = ec.case()
    d = case.config_dict()
    d["eval"]["n_batches"] = EVAL_N_BATCHES
    run = resolve_run(parse_config(d, "eval n_batches"))
    be = make_backend(backend, run)
    state = be.new_state(states(ec)[f"step{N_STEPS}"])
    step, cfg = 2, run.cfg
    got = be.host_metrics(be.evaluate(state, step))
    _, draws = eval_inputs(run)
    per = [be.eval_metrics(state, batch_for_step(run, cfg.seed, step * EVAL_N_BATCHES + j,
                                                 batch=cfg.eval.batch_size, split="eval"), draws)
           for j in range(EVAL_N_BATCHES)]
    be.close()
    keys = [k for k in got if not k.endswith("/stochastic") and not k.startswith("eval/pgd/")]
    assert any("/l0/" in k for k in keys) and any(k.endswith("/rounded") for k in keys), keys
    assert any(per[0][k] != per[1][k] for k in keys), "the eval batches are identical: the mean checks nothing"
    t = tol(case.precision, "term")
    bad = []
    for k in keys:
        mean = sum(p[k] for p in per) / EVAL_N_BATCHES
        if rel_err(got[k], mean, t.floor) > t.rel:
            bad.append(f"{k}: loop eval {got[k]!r} vs mean of the {EVAL_N_BATCHES} batches {mean!r}")
    assert not bad, f"{backend}: the loop's eval is not the mean over its batches:\n" + "\n".join(bad)
