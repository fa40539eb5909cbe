"""The training loop on the JAX backend, its checkpoints and CLI (loop/train.py with
jax_impl/backend.py, jax_impl/checkpoint.py, jax_impl/cli.py), on a tiny TMS target written to tmp_path.

- S60/S50 + checkpoints: a run stopped by SIGTERM and resumed reproduces the uninterrupted
  run exactly (every leaf of the training state bitwise, metrics.jsonl byte for byte), and
  metrics lines past the checkpoint are dropped on resume;
- S94 (checkpoints carry the resolved config): a resume under another config is refused
  with a field-by-field diff (library and CLI);
- S1: the CLI turns a bad config into one line on stderr and exit code 2;
- S50: the production step (draws from fold_in(prng_key(seed), step)) is deterministic per
  (seed, step), and different steps draw differently;
- S70: float64 through the CLI (jax_enable_x64 set before any JAX computation), in a
  subprocess because the flag is process-global.

Compile time dominates these tests, so the module compiles with XLA's
`jax_disable_most_optimizations` (restored, and the compile caches cleared, afterwards):
the properties tested — determinism and exact resume — do not depend on the optimisation level.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from contract.config import ConfigError
from contract.data import batch_for_step
from contract.targets import REPO_ROOT
from tests.helpers import HookedBackend, run_of, signal_after, write_tiny_tms

F32 = jnp.float32
# one xdist worker runs the whole module: the fixtures share one trained run and its compiled step
pytestmark = [pytest.mark.xdist_group("jax_train"), pytest.mark.usefixtures("jax_fast_compiles")]




def train_config(weights: str, **over) -> dict:
    d = {
        "seed": 3,
        "target": {"kind": "tms", "weights": weights},
        "data": {"feature_probability": 0.4},  # dense enough that recon terms are non-zero
        "sites": [{"pattern": "linear1", "C": 4}, {"pattern": "linear2", "C": 3}],
        "ci_fn": {"type": "mlp", "hidden": [3]},
        "output_loss": "mse",
        "loss_terms": [{"type": "faithfulness", "coeff": 1.0},
                       {"type": "importance_minimality", "coeff": 3e-3, "pnorm": 1.5, "beta": 0.2},
                       {"type": "stochastic_recon", "coeff": 1.0},
                       {"type": "stochastic_recon_subset", "coeff": 0.5},
                       # S82/S84: persistent sources and their Adam moments/counter must resume
                       # exactly (the (N+1)-th ascent after a resume equals the uninterrupted one)
                       {"type": "persistent_pgd_recon", "coeff": 0.5, "scope": "c", "n_warmup": 1,
                        "optimizer": {"type": "adam", "lr": {"start": 0.05}}}],
        "optim": {"components": {"lr": {"start": 1e-2, "kind": "cosine", "final_frac": 0.1}, "clip": 0.5},
                  "ci_fn": {"lr": {"start": 1e-2, "warmup_pct": 0.2, "kind": "linear"}}},
        "faithfulness_warmup": {"steps": 2, "lr": 1e-3},
        "steps": 6,
        "batch_size": 8,
        "log_every": 2,
        "eval": {"every": 3, "batch_size": 8},
        "checkpoint": {"every": 2, "keep": 2},
    }
    d.update(over)
    return d


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("jax_train")
    return d, train_config(write_tiny_tms(d))


def _leaves_bitwise_equal(a, b) -> list[str]:
    bad = []
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (pa, x), (_, y) in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            bad.append(jax.tree_util.keystr(pa))
    return bad


@pytest.fixture(scope="module")
def backend(tiny):
    """One JAX backend for the module's run: its compiled step and eval are reused by every
    training below (a resume in the same process does not recompile)."""
    from jax_impl.backend import JaxBackend
    return JaxBackend(run_of(tiny[1]))


@pytest.fixture(scope="module")
def uninterrupted(tiny, backend):
    from loop.train import train
    d, cfg = tiny
    out = d / "A"
    summary = train(backend, out, progress=False)
    return out, summary


def test_uninterrupted_run_outputs(tiny, uninterrupted):
    # the loop's files: one metrics line per logged / evaluated step, checkpoints kept = keep
    from jax_impl.checkpoint import abstract_state, list_checkpoints, load_checkpoint, read_meta
    d, cfg = tiny
    out, s = uninterrupted
    assert not s["interrupted"] and s["start_step"] == 0 and s["step"] == 6
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 2, 3, 4, 5, 6]  # log 0,2,4 + last 5; eval 0,3 + final 6
    assert "eval/mse/ci" in lines[0] and "loss/total" in lines[0] and "warmup/faithfulness_first" in lines[0]
    assert set(lines[2]) == {"step"} | {k for k in lines[0] if k.startswith("eval/")}  # eval-only line
    assert "eval/mse/stochastic" in lines[-1] and "loss/total" not in lines[-1]
    assert lines[4]["sched/lr_components"] == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi))))  # last step
    assert all(np.isfinite(v) for r in lines for v in r.values())
    assert lines[1]["loss/2.stochastic_recon"] > 0
    cks = list_checkpoints(out)
    assert [p.name for p in cks] == ["step_00000004", "step_00000006"]  # keep = 2
    run = run_of(cfg)
    meta = read_meta(cks[-1])
    assert meta["config"] == run.cfg.to_dict() and meta["step"] == 6 and meta["dtype"] == "float32"
    assert meta["prng_impl"] == "threefry2x32/draw-keys"  # S50, S143: the production stream of every mesh
    assert json.loads((cks[-1] / "meta.json").read_text())["config_hash"] == run.cfg.hash()
    st = load_checkpoint(cks[-1], run, F32)
    want = abstract_state(run, F32)
    assert jax.tree.structure(st.to_tree()) == jax.tree.structure(want)  # the stored tree of the TrainState
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(st.to_tree())] == [(x.shape, x.dtype) for x in jax.tree.leaves(want)]
    assert int(st.step) == 6 and int(st.opt_components.count) == 6 and int(st.opt_ci_fn.inner_state[0].count) == 6
    # the injected learning rate of the last step is in the optimizer state
    assert float(st.opt_components.hyperparams["learning_rate"]) == pytest.approx(1e-3, rel=1e-6)


def test_sigterm_then_resume_reproduces_uninterrupted_run(tiny, backend, uninterrupted):
    # S60/S50: batches and draws are pure functions of (seed, step) and the checkpoint holds the
    # whole state, so stop-at-SIGTERM + resume == the uninterrupted run, bit for bit.
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    from jax_impl.checkpoint import load_checkpoint
    from loop.train import train
    d, cfg = tiny
    out_a, _ = uninterrupted
    out = d / "B"
    before = signal.getsignal(signal.SIGTERM)
    # SIGTERM after step 2, handled by the loop: stop after this step
    s1 = train(HookedBackend(backend, after=signal_after(2, signal.SIGTERM)), out, progress=False)
    assert s1["interrupted"] and s1["signal"] == "SIGTERM" and s1["step"] == 3
    assert Path(s1["last_checkpoint"]).name == "step_00000003"
    assert signal.getsignal(signal.SIGTERM) == before  # train() restores the previous handler
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 2]
    # a crash after the checkpoint may have left lines past it (and a torn line): resume drops them
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss/total": 123.0}) + "\n" + '{"step": 4, "loss/to')
    s2 = train(backend, out, progress=False)
    assert s2["start_step"] == 3 and s2["step"] == 6 and not s2["interrupted"]
    assert (out / "metrics.jsonl").read_text() == (out_a / "metrics.jsonl").read_text()
    run = run_of(cfg)
    a = load_checkpoint(out_a / "checkpoints" / "step_00000006", run, F32)
    b = load_checkpoint(out / "checkpoints" / "step_00000006", run, F32)
    assert _leaves_bitwise_equal(a, b) == []
    assert s2["final_metrics"] == uninterrupted[1]["final_metrics"]


def test_resume_under_another_config_is_refused_with_a_diff(tiny, uninterrupted, capsys):
    # S94: checkpoints carry the resolved config; a different one is refused, naming fields.
    from contract.runlog import with_dtype
    from jax_impl.backend import JaxBackend
    from jax_impl.cli import main
    from loop.train import train as loop_train

    def train(run, out, **kw):
        return loop_train(JaxBackend(run), out, **kw)

    d, cfg = tiny
    out, _ = uninterrupted
    other = copy.deepcopy(cfg)
    other["loss_terms"][2]["coeff"] = 0.25
    other["batch_size"] = 16
    with pytest.raises(ConfigError) as e:
        train(run_of(other), out, progress=False)
    msg = str(e.value)
    assert "different config" in msg and "loss_terms.2.coeff: 1.0 -> 0.25" in msg and "batch_size: 8 -> 16" in msg
    # a float64 override is a config change too (runtime.dtype)
    with pytest.raises(ConfigError, match="runtime.dtype: 'float32' -> 'float64'"):
        jax_x64 = jax.config.read("jax_enable_x64")
        try:
            jax.config.update("jax_enable_x64", True)
            train(with_dtype(run_of(cfg), "float64"), out, progress=False)
        finally:
            jax.config.update("jax_enable_x64", jax_x64)
    # the CLI: one line, exit 2
    y = d / "other.yaml"
    y.write_text(yaml.safe_dump(other))
    assert main(["train", str(y), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vpd-train: error: cannot resume") and "loss_terms.2.coeff" in err[0]
    # the refused run did not touch the run dir
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step_00000004", "step_00000006"]


def test_resume_under_another_generator_is_refused(tiny, uninterrupted):
    # S50/S91: the remaining steps' draws come from the checkpoint's generator; a checkpoint
    # without the field predates Philox (threefry), and resuming it would not reproduce the run
    from jax_impl.checkpoint import check_compatible, list_checkpoints, read_meta
    _, cfg = tiny
    out, _ = uninterrupted
    ck = list_checkpoints(out)[-1]
    meta = read_meta(ck)
    check_compatible(meta, run_of(cfg), F32, ck)  # its own generator: accepted
    for old, gen in (({k: v for k, v in meta.items() if k != "prng_impl"}, "threefry2x32"),
                     (meta | {"prng_impl": "philox4x32"}, "philox4x32")):
        with pytest.raises(ConfigError, match=f"drew with the {gen} generator, this trainer draws with threefry2x32/draw-keys"):
            check_compatible(old, run_of(cfg), F32, ck)


@pytest.mark.parametrize("problem", ["unknown_field", "bad_value", "missing_file", "missing_target", "not_yaml"])
def test_cli_bad_config_exits_2_with_one_line(tmp_path, tiny, problem, capsys):
    # S1: a config problem is one line on stderr naming the field, exit code 2, nothing trained.
    from jax_impl.cli import main
    _, cfg = tiny
    c = copy.deepcopy(cfg)
    y = tmp_path / "c.yaml"
    if problem == "unknown_field":
        c["optim"]["components"]["lrr"] = 1
    elif problem == "bad_value":
        c["batch_size"] = -3
    elif problem == "missing_target":
        c["target"]["weights"] = str(tmp_path / "nope.safetensors")
    if problem == "not_yaml":
        y.write_text("seed: [1,\n")
    elif problem != "missing_file":
        y.write_text(yaml.safe_dump(c))
    assert main(["train", str(y), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vpd-train: error: "), err
    expect = {"unknown_field": "optim.components.lrr", "bad_value": "batch_size", "missing_file": "not found",
              "missing_target": "nope.safetensors", "not_yaml": "YAML"}[problem]
    assert expect in err[0]
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_production_step_is_deterministic_per_seed_and_step(tiny, backend):
    # S50: production draws come from fold_in(prng_key(seed), step) inside the step: the same
    # (seed, step, state, batch) gives the same result bit for bit; another step draws anew.
    from jax_impl.state import make_state
    from jax_impl.train import prng_key
    _, cfg = tiny
    run, model, stepper = backend.run, backend.model, backend.stepper  # the loop's own compiled step
    batch = jnp.asarray(batch_for_step(run, run.cfg.seed, 0), F32)
    outs = []
    for at in (0, 0, 1):
        st = make_state(run, None, F32)  # fresh buffers each time (the step donates its state)
        st = st.replace(step=jnp.asarray(at, jnp.int32))
        outs.append(stepper.step_with_key(st, batch, 0))
    (s0, m0), (s1, m1), (s2, m2) = outs
    assert _leaves_bitwise_equal(s0, s1) == [] and _leaves_bitwise_equal(m0, m1) == []
    # same batch, same schedule, different step counter -> different draws -> different recon loss
    assert float(m0["loss/2.stochastic_recon"]) != float(m2["loss/2.stochastic_recon"])
    assert float(m0["loss/0.faithfulness"]) == float(m2["loss/0.faithfulness"])  # draw-free term agrees
    # a different seed is a different stream (the seed's key is an argument of the same compiled step)
    st = make_state(run, None, F32)
    s3, m3 = stepper._key(st, model.frozen, batch, prng_key(cfg["seed"] + 1), stepper.hp(0))
    assert float(m3["loss/2.stochastic_recon"]) != float(m0["loss/2.stochastic_recon"])


_F64_SCRIPT = r"""
import json, sys
from jax_impl.cli import main
rc = main(sys.argv[1:])
import jax
from jax_impl.checkpoint import load_run_checkpoint
state, meta, run = load_run_checkpoint(sys.argv[4])
print("RESULT " + json.dumps({"rc": rc, "x64": jax.config.jax_enable_x64, "dtype": meta["dtype"],
      "cfg_dtype": run.cfg.runtime.dtype, "steps": run.cfg.steps,
      "dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(state.params)}),
      "mu": sorted({str(x.dtype) for x in jax.tree.leaves(state.opt_components.inner_state[0].mu)}),
      "count": str(state.opt_ci_fn.count.dtype)}))
"""


def test_cli_float64_in_subprocess(tiny, tmp_path):
    # S70: --dtype float64 turns on jax_enable_x64 before JAX computes anything; the whole state
    # (params, moments) is float64 and the override is recorded in the checkpoint's config.
    _, cfg = tiny
    y = tmp_path / "c.yaml"
    y.write_text(yaml.safe_dump(dict(cfg, eval={"every": 0}, faithfulness_warmup={"steps": 0})))
    out = tmp_path / "run64"
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1", WANDB_MODE="disabled")
    env.pop("JAX_ENABLE_X64", None)
    p = subprocess.run([sys.executable, "-c", _F64_SCRIPT, "train", str(y), "--out", str(out), "--dtype", "float64",
                        "--steps", "2", "--quiet"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))[7:])
    assert res == {"rc": 0, "x64": True, "dtype": "float64", "cfg_dtype": "float64", "steps": 2,
                   "dtypes": ["float64"], "mu": ["float64"], "count": "int32"}
    assert f"metrics: {out / 'metrics.jsonl'}" in p.stdout and "checkpoints: " in p.stdout
