"""The torch oracle's training loop, checkpoints and CLI on a tiny TMS target in tmp_path:
bitwise resume, atomic saves, refused resumes and refused configs."""
from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import oracle_torch.checkpoint as ckpt_mod
from contract.config import ConfigError
from contract.errors import EXIT_BUG
from loop.train import train as loop_train
from oracle_torch.backend import OracleBackend
from oracle_torch.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from oracle_torch.cli import main as cli_main
from oracle_torch.components import DecomposedModel
from oracle_torch.state import make_state
from oracle_torch.train import draws_for_step, train_step
from tests.helpers import (
    HookedBackend,
    crash_at,
    hook_cli_backend,
    read_metrics,
    run_of,
    signal_after,
    tms_config,
    write_cfg,
    write_tiny_tms,
)

torch.set_num_threads(1)


def train(run, out, **kw):
    """The training loop (loop/train.py) on the oracle backend."""
    return loop_train(OracleBackend(run), out, **kw)


def tiny_config(weights: str, **over) -> dict:
    d = tms_config(weights)
    d.update({
        "loss_terms": [{"type": "faithfulness", "coeff": 1.0},
                       {"type": "importance_minimality", "coeff": 3e-3, "pnorm": 1.5, "beta": 0.2},
                       {"type": "stochastic_recon", "coeff": 1.0},
                       {"type": "stochastic_recon_layerwise", "coeff": 0.5}],
        "optim": {"components": {"lr": {"start": 1e-2, "kind": "cosine", "final_frac": 0.1}, "clip": 1.0},
                  "ci_fn": {"lr": {"start": 1e-2, "warmup_pct": 0.2, "kind": "linear"}, "weight_decay": 0.01}},
        "faithfulness_warmup": {"steps": 3, "lr": 1e-3},
        "steps": 7, "batch_size": 8,
        "eval": {"every": 2, "batch_size": 16},
        "log_every": 1,
        "checkpoint": {"every": 2, "keep": 2},
    })
    d.update(over)
    return d


@pytest.fixture
def weights(tmp_path):
    return write_tiny_tms(tmp_path, rng="torch")


def latest(out) -> Path:
    """The latest checkpoint of `out`; the run must have written one."""
    p = latest_checkpoint(out)
    assert p is not None, f"no checkpoint in {out}"
    return p


def final_tensors(out) -> dict:
    return load_file(str(latest(out) / "state.safetensors"))


def assert_same_tensors(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_resume_reproduces_uninterrupted_run_bitwise(tmp_path, weights, monkeypatch):
    # S60 + S44: a resumed run (after SIGTERM, and after a crash) equals the uninterrupted run
    # bit for bit: params, AdamW state, step counters and every metrics line.
    cfg = write_cfg(tmp_path / "c.yaml", tiny_config(weights))
    assert cli_main(["train", cfg, "--out", str(tmp_path / "A"), "--quiet"]) == 0
    ref_m, ref_t = read_metrics(tmp_path / "A"), final_tensors(tmp_path / "A")
    assert [m["step"] for m in ref_m] == list(range(8)) and "eval/mse/ci" in ref_m[-1]
    assert int(ref_t["step"]) == 7 and "opt.components.exp_avg.components.linear1.V" in ref_t

    # B: SIGTERM after 3 steps (off the checkpoint cadence) -> checkpoint at step 3, exit 143
    with monkeypatch.context() as mp:
        hook_cli_backend(mp, after=signal_after(2, signal.SIGTERM))  # after step 2 = 3 steps done
        assert cli_main(["train", cfg, "--out", str(tmp_path / "B"), "--quiet"]) == 128 + signal.SIGTERM
    assert latest(tmp_path / "B").name == "step_00000003"
    assert [m["step"] for m in read_metrics(tmp_path / "B")] == [0, 1, 2]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    # ... then a crash inside step 5 (to the CLI a bug: traceback, exit 70, S105): lines 3, 4
    # are written, the last checkpoint is step 4
    with monkeypatch.context() as mp:
        hook_cli_backend(mp, before=crash_at(5))
        assert cli_main(["train", cfg, "--out", str(tmp_path / "B"), "--quiet"]) == EXIT_BUG
    assert latest(tmp_path / "B").name == "step_00000004"
    assert [m["step"] for m in read_metrics(tmp_path / "B")] == [0, 1, 2, 3, 4]  # line 4 is after the checkpoint

    assert cli_main(["train", cfg, "--out", str(tmp_path / "B"), "--quiet"]) == 0
    assert read_metrics(tmp_path / "B") == ref_m
    assert_same_tensors(final_tensors(tmp_path / "B"), ref_t)
    assert [p.name for p in list_checkpoints(tmp_path / "B")] == ["step_00000006", "step_00000007"]  # keep 2


def test_resume_with_persistent_pgd_sources_bitwise(tmp_path, weights, monkeypatch):
    # S84 + S60: persistent sources and their Adam state live in the checkpoint; a resumed run
    # equals the uninterrupted one bit for bit (fresh PGD is stateless but draws per step).
    d = tiny_config(weights, steps=5, eval={"every": 0}, checkpoint={"every": 0, "keep": 1})
    d["loss_terms"] += [{"type": "persistent_pgd_recon", "coeff": 0.5, "scope": "c", "n_warmup": 1,
                         "optimizer": {"type": "adam", "lr": {"start": 0.05}}},
                        {"type": "pgd_recon_subset", "coeff": 0.3, "n_steps": 2, "scope": "bc"}]
    run = run_of(d)
    train(run, tmp_path / "A", progress=False)
    ref_m, ref_t = read_metrics(tmp_path / "A"), final_tensors(tmp_path / "A")
    assert {"sources.t4.linear1", "opt.sources.exp_avg.sources.t4.linear2", "opt.sources.t4.step"} <= set(ref_t)
    assert int(ref_t["opt.sources.t4.step"]) == 5 + 5  # one warmup ascent + the final ascent per step

    hooked = HookedBackend(OracleBackend(run), after=signal_after(1, signal.SIGTERM))  # 2 steps done
    assert loop_train(hooked, tmp_path / "B", progress=False)["interrupted"]
    assert train(run, tmp_path / "B", progress=False)["start_step"] == 2
    assert read_metrics(tmp_path / "B") == ref_m
    assert_same_tensors(final_tensors(tmp_path / "B"), ref_t)


def test_checkpoint_roundtrip_restores_optimizer_exactly(tmp_path, weights):
    run = run_of(tiny_config(weights))
    dt = torch.float64
    state = make_state(run, None, dt)
    model = DecomposedModel(run, state.params, dt)
    from contract.data import batch_for_step
    for k in range(2):
        train_step(run, model, state, torch.as_tensor(batch_for_step(run, 0, k), dtype=dt), draws_for_step(run, k, dt))
    p = save_checkpoint(tmp_path / "o", state, run, 2, keep=3, dtype=dt, extra={"note": 1})
    meta = json.loads((p / "meta.json").read_text())
    assert meta["step"] == 2 and meta["config"] == run.cfg.to_dict() and meta["config_hash"] == run.cfg.hash()
    assert {"python", "torch", "numpy"} <= set(meta["versions"]) and meta["date"]
    st2 = load_checkpoint(p, run, dt)
    assert st2.step == 2 and meta["extra"] == {"note": 1}
    assert list(st2.params) == list(state.params)
    for n in state.params:
        assert torch.equal(st2.params[n], state.params[n])
    for a, b in ((state.opt_components, st2.opt_components), (state.opt_ci_fn, st2.opt_ci_fn)):
        sa, sb = a.state_dict(), b.state_dict()
        # lr is set from the schedule before every step; everything else is restored
        assert [{**g, "lr": 0} for g in sa["param_groups"]] == [{**g, "lr": 0} for g in sb["param_groups"]]
        assert sa["state"].keys() == sb["state"].keys() and len(sa["state"]) > 0
        for i in sa["state"]:
            for k in ("step", "exp_avg", "exp_avg_sq"):
                x, y = sa["state"][i][k], sb["state"][i][k]
                assert x.dtype == y.dtype and torch.equal(x, y), (i, k)
    with pytest.raises(ConfigError, match="float64 state"):
        load_checkpoint(p, run, torch.float32)


def _tree_hash(d) -> str:
    h = hashlib.sha256()
    for f in sorted(d.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(d).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


def test_crash_during_save_keeps_last_good_checkpoint(tmp_path, weights, monkeypatch):
    run = run_of(tiny_config(weights))
    state = make_state(run, None, torch.float32)
    out = tmp_path / "o"
    state.step = 2
    good = save_checkpoint(out, state, run, 2, keep=1)
    before = _tree_hash(good)

    real_save = ckpt_mod.st.save_file

    def torn_save(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # leave a half-written file behind, then die
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.st, "save_file", torn_save)
    state.step = 4
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(out, state, run, 4, keep=1)
    assert latest_checkpoint(out) == good and _tree_hash(good) == before
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]  # no half dir left
    # a temp dir left by a hard kill is never taken for a checkpoint, and is swept by the next save
    stale = out / "checkpoints" / ".tmp-step_00000006-1-x"
    stale.mkdir()
    (stale / "state.safetensors").write_bytes(b"junk")
    assert latest_checkpoint(out) == good
    monkeypatch.setattr(ckpt_mod.st, "save_file", real_save)
    p4 = save_checkpoint(out, state, run, 4, keep=1)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000004"]
    assert load_checkpoint(p4, run, torch.float32).step == 4


def test_resume_under_a_different_config_is_refused_with_diff(tmp_path, weights, capsys):
    d = tiny_config(weights, steps=2)
    out = tmp_path / "o"
    train(run_of(d), out, progress=False)
    d2 = json.loads(json.dumps(d))
    d2["loss_terms"][1]["coeff"] = 5e-3
    with pytest.raises(ConfigError) as e:
        train(run_of(d2), out, progress=False)
    assert "loss_terms.1.coeff: 0.003 -> 0.005" in str(e.value)
    # via the CLI: --steps is recorded in the config, so a resume with other steps is refused
    cfg = write_cfg(tmp_path / "c.yaml", d)
    assert cli_main(["train", cfg, "--out", str(out), "--steps", "3", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "steps: 2 -> 3" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    # --no-resume starts afresh and records the override
    assert cli_main(["train", cfg, "--out", str(out), "--steps", "3", "--no-resume", "--quiet"]) == 0
    meta = json.loads((latest(out) / "meta.json").read_text())
    assert meta["config"]["steps"] == 3 and meta["step"] == 3
    assert [m["step"] for m in read_metrics(out)] == [0, 1, 2, 3]


@pytest.mark.parametrize("term, needle", [
    # S25: chunk size larger than the number of sites
    ({"type": "chunkwise_subset_recon", "coeff": 1.0, "sites_per_chunk": 3},
     "loss_terms.1.sites_per_chunk: 3 is larger than the number of sites (2)"),
    # S85/S86: persistent-PGD refusals
    ({"type": "persistent_pgd_recon", "coeff": 0.0}, "loss_terms.1.coeff: a persistent PGD term with coefficient 0"),
    ({"type": "persistent_pgd_recon", "coeff": 1.0, "scope": "nsc"}, "loss_terms.1.n_sources: required with scope 'nsc'"),
    ({"type": "persistent_pgd_recon", "coeff": 1.0, "n_sources": 2}, "loss_terms.1.n_sources: only meaningful with scope 'nsc'"),
])
def test_bad_config_combos_refused_by_cli(tmp_path, weights, capsys, term, needle):
    d = tiny_config(weights, loss_terms=[{"type": "faithfulness", "coeff": 1.0}, term])
    with pytest.raises(ConfigError, match="loss_terms.1"):
        run_of(d)
    rc = cli_main(["train", write_cfg(tmp_path / "c.yaml", d), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "Traceback" not in err
    assert err.startswith("vpd-oracle: error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_cli_exit_2_on_bad_or_missing_files(tmp_path, weights, capsys):
    d = tiny_config(weights)
    d["ci_fn"]["hiden"] = [3]
    assert cli_main(["train", write_cfg(tmp_path / "bad.yaml", d), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "ci_fn.hiden: unknown field" in err and len(err.strip().splitlines()) == 1
    assert cli_main(["train", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "config file not found" in capsys.readouterr().err
    d = tiny_config(str(tmp_path / "missing.safetensors"))
    assert cli_main(["train", write_cfg(tmp_path / "m.yaml", d), "--out", str(tmp_path / "o")]) == 2
    assert "weights file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse usage errors are exit code 2 as well
        cli_main(["train", "x.yaml"])
    assert e.value.code == 2


def test_undecodable_metrics_bytes_are_dropped_not_a_crash(tmp_path):
    # S101: a damaged metrics.jsonl (bytes that are not UTF-8) loses only the damaged line on resume
    from contract.runlog import read_metric_lines
    p = tmp_path / "metrics.jsonl"
    p.write_bytes(b'{"step": 0, "a": 1}\n\xff\xfe junk\n{"step": 1, "a": 2}\n{"step": 2, "a": 3}\n')
    assert read_metric_lines(p, 2) == ['{"step": 0, "a": 1}', '{"step": 1, "a": 2}']


def test_nonpositive_threads_is_a_usage_error(tmp_path, weights, capsys):
    # S105: a bad command-line value is exit 2 with argparse's one-line usage error, not a traceback
    cfg = write_cfg(tmp_path / "c.yaml", tiny_config(weights))
    with pytest.raises(SystemExit) as e:
        cli_main(["train", cfg, "--out", str(tmp_path / "o"), "--threads", "-1"])
    assert e.value.code == 2 and "--threads" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
