"""Resume inside the gate (SPEC S155): a trajectory case stopped at step K (SIGTERM through
the training loop, checkpoint of step K), resumed by the backend's own CLI in a fresh
process and trained to the end equals the case's uninterrupted golden, in both backends.

The run is the case's config with `runtime.draws: contract` (S131: the loop feeds every step
the harness's numpy draws, so the uninterrupted run IS the golden trajectory) and its
metrics.jsonl is compared with the golden under the case's trajectory rows. A resume that
re-initialises an optimizer (components, CI function, a persistent bundle's Adam), reruns
the faithfulness warmup, restarts the p-anneal / lr schedules, loses the persistent sources
or writes a metrics line twice (or drops one) fails here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from contract.targets import REPO_ROOT
from parity.cases import CASES
from parity.goldens import Report, compare_records, compare_warmup, load_golden

# persistent sources with Adam and sign ascents, n_warmup ascents, p annealing (steps 10-40),
# lr warmup + cosine: every piece of state a resume must carry is live at the stop
RESUME_CASE = "traj_tms_ppgd.64"
RESUME_AT = 23  # the checkpoint's step: inside the p-anneal window, mid-cosine
TIMEOUT_S = 600


def _config(tmp: Path) -> Path:
    case = CASES[RESUME_CASE]
    d = case.config_dict()
    d["runtime"] = {"dtype": case.precision, "draws": "contract"}  # S131: the harness's draws
    d["log_every"] = 1
    d["eval"] = {"every": 0}
    d["checkpoint"] = {"every": 0, "keep": 2}
    p = tmp / "resume.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


def _lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _py(args: list[str]) -> subprocess.CompletedProcess:
    env = os.environ | {"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_stop_then_resume_in_a_fresh_process_is_the_golden(backend, tmp_path, record_property):
    # guards S155
    case = CASES[RESUME_CASE]
    g = load_golden(RESUME_CASE)
    assert g.manifest["config_hash"] == case.cfg().hash(), f"golden {RESUME_CASE} is stale"
    cfg, out = _config(tmp_path), tmp_path / "run"
    p1 = _py(["-m", "parity.resume_gate", "--backend", backend, "--config", str(cfg), "--out", str(out),
              "--stop-after", str(RESUME_AT - 1)])
    assert p1.returncode == 0, p1.stderr[-3000:]
    s1 = json.loads(p1.stdout.strip().splitlines()[-1])
    assert s1["interrupted"] and s1["step"] == RESUME_AT and Path(s1["last_checkpoint"]).name == f"step_{RESUME_AT:08d}", s1
    assert [r["step"] for r in _lines(out)] == list(range(RESUME_AT))
    p2 = _py(["-m", f"{'oracle_torch' if backend == 'torch' else 'jax_impl'}.cli", "train", str(cfg),
              "--out", str(out), "--quiet"])
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert f"resumed from step {RESUME_AT}" in p2.stdout, p2.stdout
    lines = _lines(out)
    # one line per step, in order: none duplicated or lost across the resume
    assert [r["step"] for r in lines] == list(range(case.steps))
    rep = Report(f"{RESUME_CASE} {backend} stop@{RESUME_AT}+resume-vs-golden")
    warm = g.terms["warmup"]
    compare_warmup(rep, [lines[0]["warmup/faithfulness_first"], lines[0]["warmup/faithfulness_last"]],
                   [warm[0], warm[-1]], case.precision)
    assert not any(k.startswith("warmup/") for r in lines[1:] for k in r), "the resumed run reran the warmup"
    records = [{k: v for k, v in r.items() if k != "step" and not k.startswith("warmup/")} for r in lines]
    compare_records(rep, records, g.trajectory, case.precision)
    cells = [f"{what} {e:.1e}/{a:.0e}" for what, (e, a, _) in rep.worst.items()]
    record_property("margins", f"{rep.label:40s} " + "  ".join(cells))
    assert rep.ok, rep.message()
