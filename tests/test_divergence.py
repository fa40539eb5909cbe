"""The divergence guard (SPEC S106), the same rule in both backends: a step with a non-finite
loss or gradient norm stops the run there (DivergenceError, exit 6, one line naming the step,
the term and the gradient leaf) and the newest checkpoint stays the last good one; no
checkpoint ever holds a NaN or an infinity; `guard.nonfinite: skip` leaves such a step's
state as it was and goes on; the JAX production loop still reads every step's flag one log
interval late (no per-step host sync); nothing changes while every step is finite.

Faults are injected deterministically through the Backend interface (`tests/helpers.py`
HookedBackend): a NaN batch at step K (its losses and gradients are NaN), or a NaN written
into the state after step K (its losses were finite); and, through the CLIs, an absurd
learning rate (step 0 is finite, its update overflows, step 1 is not)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from contract.backend import FINITE, Backend
from contract.config import ConfigError, parse_config
from contract.data import batch_for_step
from contract.draws import draw_plan, sample_numpy
from contract.errors import EXIT_DIVERGED, DivergenceError
from loop.train import train
from tests.helpers import HookedBackend, read_metrics, run_of, tms_config, write_cfg, write_tiny_tms

BACKENDS = ["torch", "jax"]
PROGS = {"torch": "vpd-oracle", "jax": "vpd-train"}
# the first non-finite term and gradient leaf of a step fed a NaN batch: faithfulness does not
# read the batch, importance minimality does; the first parameter in init order
NAN_TERM, NAN_LEAF = "loss/1.importance_minimality", "components.linear1.V"



pytestmark = pytest.mark.usefixtures("jax_fast_compiles")


def make(name: str, run) -> Backend:
    if name == "torch":
        from oracle_torch.backend import OracleBackend
        return OracleBackend(run)
    from jax_impl.backend import JaxBackend
    return JaxBackend(run)


def config(weights: str, **over) -> dict:
    d = tms_config(weights, steps=6, log_every=2, checkpoint={"every": 1, "keep": 20})
    d["data"] = {"feature_probability": 0.4}  # dense enough that recon terms are non-zero
    d.update(over)
    return d


def with_persistent(d: dict) -> dict:
    """`d` plus a persistent PGD term with a warmup ascent (sources and their ascent state)."""
    d["loss_terms"] = [*d["loss_terms"], {"type": "persistent_pgd_recon", "coeff": 0.5, "scope": "c", "n_warmup": 1,
                                          "optimizer": {"type": "adam", "lr": {"start": 0.05}}}]
    return d


class NaNBatch(HookedBackend):
    """Feeds training steps `at` a batch of NaN: every loss but faithfulness, and every
    gradient, is NaN at those steps."""

    def __init__(self, backend, at):
        super().__init__(backend)
        self.at = set(at)

    def train_step(self, state, step, batch, draws=None, probe=None):
        if step in self.at:
            batch = np.full_like(batch, np.nan)
        return super().train_step(state, step, batch, draws, probe)


class NaNState(HookedBackend):
    """Writes a NaN into parameter `leaf` of the state the training step `at` returns (its
    own losses and gradients were finite)."""

    def __init__(self, backend, at: int, leaf: str):
        super().__init__(backend)
        self.at, self.leaf = at, leaf

    def train_step(self, state, step, batch, draws=None, probe=None):
        state, m = super().train_step(state, step, batch, draws, probe)
        if step == self.at:
            if self.name == "torch":
                import torch
                with torch.no_grad():
                    state.params[self.leaf].view(-1)[0] = float("nan")
            else:
                p = state.params[self.leaf]
                state = state.replace(params={**state.params, self.leaf: p.at[(0,) * p.ndim].set(np.nan)})
        return state, m


def checkpoint_states(be, out: Path) -> dict[str, dict[str, np.ndarray]]:
    """{checkpoint name: exported state} of every checkpoint in `out`."""
    return {p.name: be.export_state(be.load_checkpoint(p)[0]) for p in be.list_checkpoints(out)}


def assert_all_finite(states: dict[str, dict[str, np.ndarray]]) -> None:
    for ck, tensors in states.items():
        for n, a in tensors.items():
            assert np.isfinite(a).all(), f"{ck}: {n} is not finite"


def is_counter(name: str) -> bool:
    """The state's own step counter (the only tensor a skipped step changes)."""
    return name in ("step", "['step']")


# ------------------------------------------------------------------ stop (the default)
@pytest.mark.parametrize("ck_every", [1, 0], ids=["checkpoint_every_step", "checkpoint_at_end"])
@pytest.mark.parametrize("name", BACKENDS)
def test_nonfinite_step_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, name, ck_every):
    # NaN at step 3: the run stops there (found before the save at step 4, or at the log
    # flush one interval later), naming step 3, its term and its first gradient leaf; the
    # checkpoints are those of the steps before it and all finite; metrics lines < 3 only.
    d = config(write_tiny_tms(tmp_path), steps=8, checkpoint={"every": ck_every, "keep": 20})
    run = run_of(d)
    be = NaNBatch(make(name, run), at=[3])
    with pytest.raises(DivergenceError) as err:
        train(be, tmp_path / "out", progress=False)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"training diverged at step 3: {NAN_TERM} = nan, first non-finite gradient {NAN_LEAF} "), msg
    assert err.value.exit_code == EXIT_DIVERGED
    states = checkpoint_states(make(name, run), tmp_path / "out")
    if ck_every:
        assert list(states) == ["step_00000001", "step_00000002", "step_00000003"]  # step 3's start is the last
        assert f"the last good checkpoint is {tmp_path / 'out' / 'checkpoints' / 'step_00000003'}" in msg
    else:
        assert states == {} and "no checkpoint was written" in msg
    assert_all_finite(states)
    lines = read_metrics(tmp_path / "out")
    assert [r["step"] for r in lines] == [0, 2]  # log_every 2: nothing of step 3 or later
    assert all(math.isfinite(v) for r in lines for v in r.values())
    assert all(FINITE not in r for r in lines)


@pytest.mark.parametrize("name", BACKENDS)
def test_a_nonfinite_state_is_never_saved(tmp_path, name):
    # a NaN in the state after step 2 with every loss and gradient norm of steps 0-2 finite:
    # the save at step 3 refuses it, naming the tensor; checkpoints 1 and 2 stand
    run = run_of(config(write_tiny_tms(tmp_path)))
    be = NaNState(make(name, run), at=2, leaf="components.linear2.U")
    with pytest.raises(DivergenceError) as err:
        train(be, tmp_path / "out", progress=False)
    msg = str(err.value)
    assert "state after step 2 holds a non-finite value in components.linear2.U" in msg
    assert "checkpoint step 3 was not written" in msg and "step_00000002" in msg
    states = checkpoint_states(make(name, run), tmp_path / "out")
    assert list(states) == ["step_00000001", "step_00000002"]
    assert_all_finite(states)


@pytest.mark.parametrize("name", BACKENDS)
def test_nonfinite_leaf_names_the_tensor(tmp_path, name):
    run = run_of(with_persistent(config(write_tiny_tms(tmp_path))))
    be = make(name, run)
    state = be.new_state()
    assert be.nonfinite_leaf(state) is None
    state, _ = NaNState(be, at=0, leaf="ci_fn.linear1.w0").train_step(state, 0, batch_for_step(run, 0, 0))
    assert be.nonfinite_leaf(state) == "ci_fn.linear1.w0"


@pytest.mark.parametrize("name", BACKENDS)
def test_cli_absurd_learning_rate_exits_6_with_one_line(tmp_path, name, capsys):
    # the case: lr 1e30. Step 0 is finite (its update overflows the next forward),
    # step 1 is not: exit 6, one line naming step 1, a term and a gradient leaf; checkpoint 1
    # (the state before step 1) is the only one and finite
    if name == "torch":
        from oracle_torch.cli import main
    else:
        from jax_impl.cli import main
    d = config(write_tiny_tms(tmp_path), optim={"components": {"lr": {"start": 1e30}}, "ci_fn": {"lr": {"start": 1e30}}})
    y = write_cfg(tmp_path / "c.yaml", d)
    rc = main(["train", y, "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == EXIT_DIVERGED == 6
    assert len(err) == 1, err
    assert err[0].startswith(f"{PROGS[name]}: error: training diverged at step 1: loss/"), err[0]
    assert "first non-finite gradient components." in err[0] and "step_00000001" in err[0]
    states = checkpoint_states(make(name, run_of(d)), tmp_path / "out")
    assert list(states) == ["step_00000001"]
    assert_all_finite(states)


# ------------------------------------------------------------------ skip
@pytest.mark.parametrize("name", BACKENDS)
def test_skip_leaves_the_state_of_a_nonfinite_step_and_goes_on(tmp_path, name, capsys):
    # NaN at steps 2 and 4 under guard.nonfinite: skip: the run ends; every checkpoint is
    # finite; a skipped step leaves parameters, optimizer states, persistent sources and their
    # ascent state (warmup included) exactly as they were, only the step counter moves; one
    # warning per skipped step; the count in the summary and in the checkpoints' extra
    d = with_persistent(config(write_tiny_tms(tmp_path), guard={"nonfinite": "skip"}))
    run = run_of(d)
    summary = train(NaNBatch(make(name, run), at=[2, 4]), tmp_path / "out", progress=False)
    assert summary["step"] == 6 and summary["skipped/nonfinite"] == 2
    warns = [x for x in capsys.readouterr().err.splitlines() if "warning" in x]
    assert len(warns) == 3 and all(x.startswith(f"{PROGS[name]}: warning: skipped the update of step ") for x in warns[:2])
    assert warns[2].startswith(f"{PROGS[name]}: warning: 2 training step(s) had a non-finite loss or gradient and were "
                               "skipped (guard.nonfinite: skip; first step 2, last step 4)"), warns[2]
    assert f"step 2: {NAN_TERM} = nan, first non-finite gradient {NAN_LEAF}" in warns[0] and "step 4" in warns[1]
    be = make(name, run)
    states = checkpoint_states(be, tmp_path / "out")
    assert list(states) == [f"step_{i:08d}" for i in range(1, 7)]
    assert_all_finite(states)
    for before, after in ((2, 3), (4, 5)):  # checkpoint k holds the state before step k
        a, b = states[f"step_{before:08d}"], states[f"step_{after:08d}"]
        assert set(a) == set(b)
        assert any(n.startswith(("sources.", "['sources']")) for n in a)
        changed = [n for n in a if not is_counter(n) and not np.array_equal(a[n], b[n])]
        assert changed == [], f"step {before} was skipped but changed {changed}"
    a, b = states["step_00000003"], states["step_00000004"]  # a finite step updates
    assert any(not np.array_equal(a[n], b[n]) for n in a if n.startswith(("components.", "['params']")))
    extra = be.load_checkpoint(be.list_checkpoints(tmp_path / "out")[-1])[1]
    assert extra["skipped_nonfinite"] == {"count": 2, "first": 2, "last": 4}
    assert "skipped_nonfinite" not in be.load_checkpoint(be.list_checkpoints(tmp_path / "out")[1])[1]  # step 2
    lines = read_metrics(tmp_path / "out")
    assert [r["step"] for r in lines] == [0, 2, 4, 5]
    assert math.isnan(lines[1][NAN_TERM]) and all(math.isfinite(v) for v in lines[3].values())


@pytest.mark.parametrize("name", BACKENDS)
def test_skip_changes_no_number_while_every_step_is_finite(tmp_path, name):
    w = write_tiny_tms(tmp_path)
    outs = {}
    for mode in ("stop", "skip"):
        run = run_of(with_persistent(config(w, guard={"nonfinite": mode}, log_every=1, steps=4,
                                            checkpoint={"every": 2, "keep": 20})))
        assert train(make(name, run), tmp_path / mode, progress=False)["skipped/nonfinite"] == 0
        outs[mode] = (read_metrics(tmp_path / mode), checkpoint_states(make(name, run), tmp_path / mode))
    assert outs["skip"][0] == outs["stop"][0]
    for ck, tensors in outs["stop"][1].items():
        other = outs["skip"][1][ck]
        assert [n for n in tensors if not np.array_equal(tensors[n], other[n])] == [], ck


def test_skip_warnings_are_rate_limited(tmp_path, capsys):
    # lr 1e30: every step from 1 on is skipped (13); warnings for the first 10 only
    d = config(write_tiny_tms(tmp_path), steps=14, checkpoint={"every": 0, "keep": 1}, guard={"nonfinite": "skip"},
               optim={"components": {"lr": {"start": 1e30}}, "ci_fn": {"lr": {"start": 1e30}}})
    run = run_of(d)
    assert train(make("torch", run), tmp_path / "out", progress=False)["skipped/nonfinite"] == 13
    warns = [x for x in capsys.readouterr().err.splitlines() if "warning: skipped the update" in x]
    assert len(warns) == 10 and "further warnings every 100th skip" in warns[-1]
    assert_all_finite(checkpoint_states(make("torch", run), tmp_path / "out"))


# ------------------------------------------------------------------ asynchrony and parity
class Watched(HookedBackend):
    """Records, for every `host_metrics` call, the training steps whose values it pulls and
    the last step started when it was called."""

    def __init__(self, backend):
        super().__init__(backend)
        self.owner: dict[int, int] = {}  # id(value) -> its step
        self.keep: list = []  # every value stays alive, so no id is reused
        self.at = -1
        self.pulls: list[tuple[int, set[int]]] = []

    def train_step(self, state, step, batch, draws=None, probe=None):
        self.at = step
        state, m = super().train_step(state, step, batch, draws, probe)
        for k in ("loss/total", FINITE):  # values made anew every step (a schedule value may be one object)
            if k in m:
                self.owner[id(m[k])] = step
                self.keep.append(m[k])
        return state, m

    def host_metrics(self, metrics):
        self.pulls.append((self.at, {self.owner[id(v)] for v in metrics.values() if id(v) in self.owner}))
        return super().host_metrics(metrics)


@pytest.mark.parametrize("name", BACKENDS)
def test_flags_and_lines_are_pulled_one_log_interval_late(tmp_path, name):
    # while training, nothing of step j (its finite flag, its metrics) is read on the host
    # before step j + log_every has started: the loop never waits for the step it just issued
    run = run_of(config(write_tiny_tms(tmp_path), steps=12, log_every=3, checkpoint={"every": 0, "keep": 1}))
    be = Watched(make(name, run))
    train(be, tmp_path / "out", progress=False)
    during = [(at, steps) for at, steps in be.pulls if at < run.cfg.steps - 1]
    assert {at for at, _ in during} == {3, 6, 9}  # log steps only, never in between
    pulled = set().union(*(s for _, s in during))
    assert pulled == set(range(0, 7)), pulled  # at step 9 every step up to 6 has been checked
    assert all(j <= at - 3 for at, steps in during for j in steps), during
    assert [r["step"] for r in read_metrics(tmp_path / "out")] == [0, 3, 6, 9, 11]


@pytest.mark.parametrize("name", BACKENDS)
def test_the_flag_is_production_only(tmp_path, name):
    # the parity step's metrics (explicit draws) are what the goldens hold: no flag there; the
    # JAX production step carries it as a device value, the oracle leaves it to the loop
    run = run_of(config(write_tiny_tms(tmp_path)))
    be = make(name, run)
    b = batch_for_step(run, 0, 0)
    _, parity = be.train_step(be.new_state(), 0, b, sample_numpy(draw_plan(run), run.cfg.seed, 0))
    _, prod = be.train_step(be.new_state(), 0, b)
    assert FINITE not in parity
    assert set(prod) - set(parity) == ({FINITE} if name == "jax" else set())
    if name == "jax":
        import jax
        assert isinstance(prod[FINITE], jax.Array) and prod[FINITE].dtype == bool and bool(prod[FINITE])


def test_guard_config():
    # the default guard is left out of the config's dict and hash (older configs, goldens and
    # checkpoints stay valid); `skip` is recorded; anything else is refused naming the field
    d = tms_config("w.safetensors")
    base = parse_config(d)
    assert base.guard.nonfinite == "stop" and "guard" not in base.to_dict()
    assert parse_config(d | {"guard": {"nonfinite": "stop"}}).hash() == base.hash()
    skip = parse_config(d | {"guard": {"nonfinite": "skip"}})
    assert skip.to_dict()["guard"] == {"nonfinite": "skip"} and skip.hash() != base.hash()
    assert parse_config(skip.to_dict()) == skip
    with pytest.raises(ConfigError, match=r"guard\.nonfinite"):
        parse_config(d | {"guard": {"nonfinite": "ignore"}})
