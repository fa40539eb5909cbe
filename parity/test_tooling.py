"""Tests of the parity tooling itself: the fail-closed comparison, provenance notes, the
sanctioned regeneration, the oracle lock, stage bundles and trajectory plots.

These guard the gate (test_parity.py), not the trainers: a comparison that silently
passes, a regeneration that touches more than it was asked to, or a lock that does not
name what changed would make every parity result meaningless. Each test says in a comment
which behaviour it guards. Only one tiny float64 TMS case is ever run (tms_global_mlp),
and every file write goes to tmp_path (the committed goldens/ are never touched)."""
from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest

import parity.goldens as G
import parity.lock as L
import parity.regen as R
import parity.stages as S
from contract.targets import REPO_ROOT
from parity.cases import CASES
from parity.goldens import Golden, Report, compare_grads, compare_records, compare_result, load_golden
from parity.tolerances import tol

pytestmark = pytest.mark.xdist_group("parity_tooling")  # one worker: the bundle fixture is built once

TRAJ = "traj_tms.64"  # a committed 50-step float64 golden: realistic keys and magnitudes
TINY = "tms_global_mlp"  # the cheapest case to run live (1 step, float64, 2 sites)
REGEN_CASE = "resid2_chunks"  # cheap (1 step, float64), not refused as degenerate by regen (parity/degeneracy.py)


@pytest.fixture(scope="module", autouse=True)
def repo_goldens_before():
    """Bytes and mtimes of the committed goldens/ when this module's tests start."""
    return _snapshot(REPO_ROOT / "goldens")


@pytest.fixture(scope="module")
def golden_traj() -> Golden:
    return load_golden(TRAJ)


def _want(g: Golden) -> tuple:
    return copy.deepcopy(g.trajectory), {k: v.copy() for k, v in g.grads.items()}, list(g.terms["warmup"])


def _scale(x: float, rel: float) -> float:
    return float(x) * (1.0 + rel)


# ------------------------------------------------------------------ fail-closed comparison
def test_identical_result_passes_with_zero_margins(golden_traj):
    # guards: a result equal to its golden is ok, and every quantity shows up in Report.worst
    want = _want(golden_traj)
    rep = compare_result("same", "float64", _want(golden_traj), want)
    assert rep.ok, rep.message()
    assert set(rep.worst) == {"warmup", "step0 terms", "trajectory", "step0 grads"}
    assert all(e == 0.0 for e, _, _ in rep.worst.values())


def test_golden_key_not_produced_fails_and_names_key(golden_traj):
    # guards: fail closed — a golden metric the run no longer produces is a failure naming it
    got, want = _want(golden_traj), _want(golden_traj)
    for r in got[0]:
        del r["loss/2.stochastic_recon"]
    rep = compare_result("missing", "float64", got, want)
    assert not rep.ok
    assert rep.failures[0].startswith("step 0: golden keys not produced")
    assert "loss/2.stochastic_recon" in rep.failures[0]


def test_produced_key_without_golden_fails_and_names_key(golden_traj):
    # guards: fail closed — a new metric with no golden is a failure naming it (not ignored)
    got, want = _want(golden_traj), _want(golden_traj)
    got[0][3]["loss/9.brand_new_term"] = 0.5
    rep = compare_result("extra", "float64", got, want)
    assert not rep.ok
    assert rep.failures[0] == "step 3: produced keys with no golden: ['loss/9.brand_new_term']"


def test_step_count_and_grad_leaf_and_warmup_mismatch_fail(golden_traj):
    # guards: fail closed on a shorter trajectory, a missing / extra gradient leaf, a grad
    # shape change and a different number of warmup losses
    got, want = _want(golden_traj), _want(golden_traj)
    got[0].pop()
    got[1]["components.extra.V"] = np.zeros(3)
    del got[1]["components.linear2.U"]
    got[1]["components.linear1.V"] = got[1]["components.linear1.V"].T.copy()  # non-square: a transpose shows
    got[2].append(0.1)
    rep = compare_result("shape", "float64", got, want)
    text = "\n".join(rep.failures)
    n_warm, n_steps = len(want[2]), len(want[0])
    assert f"faithfulness warmup: {n_warm + 1} losses vs golden {n_warm}" in text
    assert f"{n_steps - 1} steps produced, golden has {n_steps}" in text
    assert "step-0 gradients produced with no golden: ['components.extra.V']" in text
    assert "golden step-0 gradients not produced: ['components.linear2.U']" in text
    assert "step-0 grad components.linear1.V: shape (7, 5) vs golden (5, 7)" in text


def test_first_failure_is_earliest_step_not_largest_error(golden_traj):
    # guards: the report leads with the FIRST diverging step and metric (step 7 here), even
    # though a later step (30) diverges by far more
    got, want = _want(golden_traj), _want(golden_traj)
    recs = got[0]
    recs[7]["loss/2.stochastic_recon"] = _scale(recs[7]["loss/2.stochastic_recon"], 1e-6)
    recs[30]["loss/total"] = _scale(recs[30]["loss/total"], 1e-1)
    rep = compare_result("order", "float64", got, want)
    assert not rep.ok
    assert rep.failures[0].startswith("step 7 loss/2.stochastic_recon:"), rep.failures
    assert "rel err 1.00e-06 > 1.0e-08" in rep.failures[0]
    assert rep.failures[1].startswith("step 30 loss/total:")
    assert rep.message().splitlines()[0].startswith("order: 2 problem(s); first: step 7 loss/2.stochastic_recon")
    # the worst margin still points at the largest error
    assert rep.worst["trajectory"][2] == "step 30 loss/total"


def test_within_a_step_losses_are_reported_before_other_metrics(golden_traj):
    # guards: inside one step, loss terms are reported before grad/param norms (the term
    # usually names the cause), regardless of which diverges more
    got, want = _want(golden_traj), _want(golden_traj)
    r = got[0][7]
    r["param_norm/ci_fn"] = _scale(r["param_norm/ci_fn"], 1e-2)
    r["loss/3.stochastic_recon_layerwise"] = _scale(r["loss/3.stochastic_recon_layerwise"], 1e-7)
    rep = compare_result("order2", "float64", got, want)
    assert [f.split(":")[0] for f in rep.failures] == ["step 7 loss/3.stochastic_recon_layerwise", "step 7 param_norm/ci_fn"]


def test_perturbed_gradient_names_leaf_and_index(golden_traj):
    # guards: a step-0 gradient mismatch names the leaf and the index of the largest difference
    got, want = _want(golden_traj), _want(golden_traj)
    g = got[1]["components.linear1.V"]
    g[3, 5] += 1e-6 * np.linalg.norm(g)
    rep = Report("grads")
    compare_grads(rep, got[1], want[1], "float64")
    assert len(rep.failures) == 1, rep.failures
    assert rep.failures[0].startswith("step-0 grad components.linear1.V: max |diff| / ||grad|| = ")
    assert rep.failures[0].endswith("at index (3, 5)")
    assert rep.worst["step0 grads"][2] == "leaf components.linear1.V"


def test_within_tolerance_noise_passes_and_worst_records_margins(golden_traj):
    # guards: noise below every tolerance passes, and Report.worst records the largest
    # error per quantity with its tolerance and location (the margins table of the gate)
    rng = np.random.default_rng(0)
    got, want = _want(golden_traj), _want(golden_traj)
    for r in got[0]:
        for k in r:
            r[k] = _scale(r[k], 1e-13 * rng.standard_normal())
    got[0][12]["loss/total"] = _scale(want[0][12]["loss/total"], 5e-9)  # the worst, still < 1e-8
    got[0][0]["loss/total"] = _scale(want[0][0]["loss/total"], 2e-11)  # step 0: tolerance 1e-10
    for n, g in got[1].items():
        got[1][n] = g * (1 + 1e-13 * rng.standard_normal(g.shape))
    got[2][:] = [_scale(x, 1e-12) for x in got[2]]
    rep = compare_result("noise", "float64", got, want)
    assert rep.ok, rep.message()
    e, allowed, where = rep.worst["trajectory"]
    assert (where, allowed) == ("step 12 loss/total", tol("float64", "trajectory").rel)
    assert e == pytest.approx(5e-9, rel=1e-3)
    e0, a0, w0 = rep.worst["step0 terms"]
    assert (w0, a0) == ("step 0 loss/total", 1e-10) and e0 == pytest.approx(2e-11, rel=1e-3)
    assert 0 < rep.worst["step0 grads"][0] < tol("float64", "grad").rel
    assert 0 < rep.worst["warmup"][0] < tol("float64", "trajectory").rel
    assert "worst trajectory: 5.00e-09 (allowed 1.0e-08) at step 12 loss/total" in rep.message()


def test_float32_trajectory_budget_grows_with_step(golden_traj):
    # guards: the documented float32 budget rel*(1 + growth*step): 2e-3 passes at step 40
    # (allowed 2.5e-3) but fails at step 1 (allowed 5.5e-4)
    t = tol("float32", "trajectory")
    for step, ok in ((40, True), (1, False)):
        got, want = copy.deepcopy(golden_traj.trajectory), golden_traj.trajectory
        got[step]["loss/total"] = _scale(got[step]["loss/total"], 2e-3)
        rep = Report("f32")
        compare_records(rep, got, want, "float32")
        assert rep.ok is ok, (step, rep.failures)
        assert rep.worst["trajectory"][1] == pytest.approx(t.rel * (1 + t.growth * step))
    assert rep.failures[0].startswith("step 1 loss/total:")


# ------------------------------------------------------------------ provenance
def test_provenance_note_names_package_and_both_versions(golden_traj):
    # guards: a golden made under other library versions still gates, but the note says
    # which package differs and gives both versions
    g = copy.deepcopy(golden_traj)
    g.manifest["versions"] = G.versions() | {"numpy": "1.0.0", "torch": "0.1.0"}
    note = G.provenance_note(g)
    assert f"numpy: golden 1.0.0 vs now {G.versions()['numpy']}" in note
    assert f"torch: golden 0.1.0 vs now {G.versions()['torch']}" in note
    assert "jax:" not in note  # unchanged packages are not listed
    g.manifest["versions"] = G.versions()
    assert G.provenance_note(g).endswith("; same library versions")


# ------------------------------------------------------------------ regeneration
@pytest.fixture
def tmp_goldens(tmp_path, monkeypatch):
    """A copy of goldens/ in tmp_path; goldens, regen and the lock point at it."""
    d = tmp_path / "goldens"
    shutil.copytree(G.GOLDENS, d)
    monkeypatch.setattr(G, "GOLDENS", d)
    monkeypatch.setattr(R, "GOLDENS", d)
    monkeypatch.setattr(L, "LOCK_FILE", d / "oracle.lock")  # regen must never write the real lock
    # a lock matching the oracle as it is now, so these tests do not depend on whether the
    # working tree's oracle is currently in step with the committed lock
    L.write_lock("tooling test baseline", "2000-01-01")
    return d


def _snapshot(root) -> dict:
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_regen_rewrites_only_the_named_case_and_logs_reason(tmp_goldens, capsys):
    # guards: `parity.regen --cases X --reason R` runs the oracle for X only, rewrites only
    # X's files, stamps the reason in X's manifest, appends R to the CHANGELOG and prints
    # the old-vs-new table naming X
    before = _snapshot(tmp_goldens)
    reason = "tooling test: regenerate one case"
    assert R.main(["--reason", reason, "--cases", REGEN_CASE]) == 0
    out = capsys.readouterr().out
    after = _snapshot(tmp_goldens)
    assert set(after) == set(before)
    changed = {f for f in before if before[f] != after[f]}
    ours = {f"{REGEN_CASE}/{f}" for f in ("manifest.json", "terms.json", "trajectory.json", "grads.safetensors")}
    assert changed == ours | {"CHANGELOG.md"}, sorted(changed)
    assert json.loads((tmp_goldens / REGEN_CASE / "manifest.json").read_text())["reason"] == reason
    log = after["CHANGELOG.md"][0].decode()
    old_log = before["CHANGELOG.md"][0].decode()
    assert log.startswith(old_log)
    added = log[len(old_log):]
    # the oracle is deterministic: same bits again
    assert f"— {reason}\n" in added and f"cases: {REGEN_CASE}\n" in added and f"- {REGEN_CASE}: unchanged" in added
    assert f"{REGEN_CASE}: unchanged" in out
    # the regenerated golden loads and carries the same metric keys
    assert load_golden(REGEN_CASE).trajectory[0].keys() == json.loads(before[f"{REGEN_CASE}/trajectory.json"][0])[0].keys()


def test_regen_refuses_when_oracle_lock_mismatches(tmp_goldens, monkeypatch, capsys):
    # guards: S90 — with oracle_torch/ out of step with its lock, regen refuses (exit 2)
    # unless --update-lock sanctions the change; nothing is written
    monkeypatch.setattr(L, "oracle_hash", lambda: "0" * 64)
    before = _snapshot(tmp_goldens)
    assert R.main(["--reason", "should refuse", "--cases", REGEN_CASE]) == 2
    err = capsys.readouterr().err
    assert "refusing to regenerate" in err and "--update-lock" in err
    assert _snapshot(tmp_goldens) == before


def test_regen_refuses_unknown_case_and_empty_reason(tmp_goldens, capsys):
    # guards: an unknown case name is refused (exit 2, named) before anything runs, and a
    # blank reason is an argparse error
    before = _snapshot(tmp_goldens)
    assert R.main(["--reason", "x", "--cases", REGEN_CASE, "no_such_case"]) == 2
    assert "no_such_case" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        R.main(["--reason", "   ", "--cases", REGEN_CASE])
    assert e.value.code == 2
    assert _snapshot(tmp_goldens) == before


# ------------------------------------------------------------------ oracle lock
def test_lock_problem_names_changed_oracle_file(tmp_path, monkeypatch):
    # guards: S90 — the lock check passes on an unchanged oracle, names exactly the changed
    # (or added) file when one differs, and is satisfied again after the sanctioned rewrite
    root = tmp_path / "repo"
    shutil.copytree(L.ORACLE_DIR, root / "oracle_torch", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "goldens").mkdir()
    monkeypatch.setattr(L, "REPO_ROOT", root)
    monkeypatch.setattr(L, "ORACLE_DIR", root / "oracle_torch")
    monkeypatch.setattr(L, "LOCK_FILE", root / "goldens" / "oracle.lock")
    L.write_lock("tooling test baseline", "2000-01-01")  # the copy, locked as it is now
    assert L.lock_problem() is None
    with open(root / "oracle_torch" / "sigmoids.py", "a") as f:
        f.write("\n# an unsanctioned edit\n")
    msg = L.lock_problem()
    assert msg is not None and "changed files: oracle_torch/sigmoids.py." in msg and "--update-lock" in msg
    (root / "oracle_torch" / "extra.py").write_text("x = 1\n")
    msg = L.lock_problem()
    assert msg is not None and "changed files: oracle_torch/extra.py, oracle_torch/sigmoids.py." in msg
    L.write_lock("tooling test", "2000-01-01")
    assert L.lock_problem() is None
    (root / "goldens" / "oracle.lock").unlink()
    msg = L.lock_problem()
    assert msg is not None and "is missing" in msg


# ------------------------------------------------------------------ stage bundles
@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Torch twice and JAX once on the tiny float64 case (step 0)."""
    d = tmp_path_factory.mktemp("bundles")
    paths = {"torch_a": d / "torch_a.safetensors", "torch_b": d / "torch_b.safetensors", "jax": d / "jax.safetensors"}
    for key, backend in (("torch_a", "torch"), ("torch_b", "torch"), ("jax", "jax")):
        assert S.main(["dump", "--case", TINY, "--backend", backend, "--out", str(paths[key])]) == 0
    return {k: str(v) for k, v in paths.items()}


def _rows(out: str) -> list[list[str]]:
    """Table rows of a compare printout as split fields (header and verdict excluded)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("stage "))
    return [line.split() for line in lines[start + 1:-1]]


def test_stage_bundles_same_backend_are_identical_by_sha256(bundles, capsys):
    # guards: two dumps of the same backend/precision compare exactly (sha256 of the
    # bytes), i.e. the oracle is deterministic and the exact mode is chosen
    assert S.main(["compare", bundles["torch_a"], bundles["torch_b"]]) == 0
    out = capsys.readouterr().out
    assert "[exact: sha256]" in out and out.rstrip().endswith("all stages agree")
    rows = _rows(out)
    tensors, _ = S.read_bundle(bundles["torch_a"])
    assert len(rows) == len(tensors) and all(r[-1] == "IDENTICAL" for r in rows)


def test_stage_bundles_torch_vs_jax_float64_all_ok(bundles, capsys):
    # guards: cross-backend compare uses the per-stage tolerance table and every stage of
    # the pipeline is present in both bundles and agrees in float64
    assert S.main(["compare", bundles["torch_a"], bundles["jax"]]) == 0
    out = capsys.readouterr().out
    assert "[exact" not in out and out.rstrip().endswith("all stages agree")
    rows = _rows(out)
    assert all(r[-1] == "ok" for r in rows), [r for r in rows if r[-1] != "ok"]
    assert {"draw", "clean_out", "site_input", "ci_logits", "ci_lower", "ci_upper", "mask", "masked_out",
            "term", "grad"} <= {r[0] for r in rows}


def test_stage_bundles_perturbed_tensor_is_first_failure(bundles, tmp_path, capsys):
    # guards: one perturbed tensor is marked as the first failure (by its stage and name)
    # and compare exits 1, both in exact mode (vs torch) and tolerance mode (vs jax)
    tensors, meta = S.read_bundle(bundles["torch_a"])
    assert tensors["ci_lower.linear2"].shape[-1] == 5
    tensors["ci_lower.linear2"] = tensors["ci_lower.linear2"].copy()
    tensors["ci_lower.linear2"].flat[3] += 1e-6
    bad = str(tmp_path / "bad.safetensors")
    S.write_bundle(bad, tensors, meta)
    for other, status in ((bundles["torch_a"], "BYTES DIFFER"), (bundles["jax"], "FAIL")):
        assert S.main(["compare", bad, other]) == 1
        out = capsys.readouterr().out
        marked = [line for line in out.splitlines() if line.endswith("<-- first failure")]
        assert len(marked) == 1 and marked[0].split()[:2] == ["ci_lower", "ci_lower.linear2"], out
        assert status in marked[0]
        assert out.rstrip().endswith("first failing stage: ci_lower (ci_lower.linear2)")


def test_stage_bundles_pinning_reproduces_torch_ci_lower(bundles, tmp_path, capsys):
    # guards: pinning feeds another bundle's stages back in: a JAX dump pinned to the torch
    # bundle's ci_lower and draws carries those tensors bit for bit; unknown stages refused
    pinned = str(tmp_path / "jax_pinned.safetensors")
    assert S.main(["dump", "--case", TINY, "--backend", "jax", "--out", pinned,
                   "--pin", bundles["torch_a"], "--pin-stages", "ci_lower,draws"]) == 0
    got, meta = S.read_bundle(pinned)
    want, _ = S.read_bundle(bundles["torch_a"])
    assert meta["pinned"] == ["ci_lower", "draws"]
    names = [n for n in want if S.stage_of(n) in ("ci_lower", "draw")]
    assert any(n.startswith("ci_lower.") for n in names) and any(n.startswith("draw.") for n in names)
    for n in names:
        assert got[n].dtype == want[n].dtype and got[n].tobytes() == want[n].tobytes(), n
    capsys.readouterr()
    S.main(["compare", bundles["torch_a"], pinned])  # pinned bundles compare by tolerance, never sha256
    out = capsys.readouterr().out
    assert "[exact" not in out
    assert all(r[2] == "0.00e+00" for r in _rows(out) if r[0] == "ci_lower")
    with pytest.raises(ValueError, match="cannot be pinned"):
        S.pins_from_bundle(bundles["torch_a"], ["grad"])


# ------------------------------------------------------------------ persistent PGD through the backends
PPGD = "traj_tms_ppgd.64"  # three persistent-PGD terms (adam / sign, shared / per-position), n_warmup 2 and 1


@pytest.fixture(scope="module")
def ppgd_bundles(tmp_path_factory):
    """`parity.stages dump` of step 0 of a persistent-PGD case, torch and JAX."""
    d = tmp_path_factory.mktemp("ppgd_bundles")
    paths = {b: str(d / f"{b}.safetensors") for b in ("torch", "jax")}
    for b, path in paths.items():
        assert S.main(["dump", "--case", PPGD, "--backend", b, "--out", path]) == 0
    return paths


def test_stage_bundles_persistent_pgd_torch_vs_jax(ppgd_bundles, capsys):
    # guards: both dumps go through Backend.train_step with a probe, so the recorded step
    # sees the persistent sources after the adversary warmup: every stage, every persistent
    # term and the gradient of each persistent term wrt its sources (grad.sources.*) is in
    # both bundles and agrees within the float64 tolerance table
    run = CASES[PPGD].run()
    persistent = [t for t in run.recon_terms if t.source == "persistent_pgd"]
    assert S.main(["compare", ppgd_bundles["torch"], ppgd_bundles["jax"]]) == 0
    out = capsys.readouterr().out
    assert "[exact" not in out and out.rstrip().endswith("all stages agree")
    rows = _rows(out)
    assert all(r[-1] == "ok" for r in rows), [r for r in rows if r[-1] != "ok"]
    names = {r[1] for r in rows}
    src = {f"grad.sources.{t.bundle}.{s.name}" for t in persistent for s in run.sites}
    assert len({t.bundle for t in persistent}) == 3 and src <= names, sorted(src - names)
    assert {f"term.{t.index}.{t.type}" for t in persistent} <= names
    assert {"clean_out", "term.total", "grad.components.linear1.V"} <= names
    tensors, meta = S.read_bundle(ppgd_bundles["jax"])
    assert meta["backend"] == "jax" and meta["case"] == PPGD
    # something to compare: at step 0 the subset term's sources get a nonzero gradient
    assert max(float(np.abs(tensors[n]).max()) for n in src) > 1e-4


def test_tms_recovery_through_both_backends(tmp_path, capsys):
    # guards: parity.tms_recovery loads a checkpoint of either backend through the backend
    # interface (default: the backend that wrote it) and scores the CI of the checkpoint's
    # state (one step past the init): equal to the backend's own ci_lower of that state, and
    # the same in both backends; a checkpoint read with the other backend is refused (exit 2)
    from loop.backends import make_backend
    from parity import tms_recovery as TR
    from parity.runners import make_inputs

    run = CASES[PPGD].run()
    inp = make_inputs(run, "float64", 1)
    x = TR.one_hot_inputs(5)
    ci, ck = {}, None
    for b in ("torch", "jax"):
        be = make_backend(b, run)
        init_ci = be.ci_lower(be.new_state(inp.init), x)
        state, _ = be.train_step(be.new_state(inp.init), 0, inp.batches[0], inp.draws[0])
        want = be.ci_lower(state, x)
        ck = be.save_checkpoint(tmp_path / b, state, be.state_step(state), {})
        be.close()
        js = tmp_path / f"{b}.json"
        assert TR.main(["--checkpoint", str(tmp_path / b), "--out", str(tmp_path / f"{b}.png"), "--json", str(js)]) == 0
        out = capsys.readouterr().out
        assert "recovered: NO" in out and f"heat map: {tmp_path / b}.png" in out
        ci[b] = {k: np.asarray(v) for k, v in json.loads(js.read_text())["ci"].items()}
        assert ci[b].keys() == want.keys() == {"linear1", "linear2"}
        for k in want:
            assert np.array_equal(ci[b][k], want[k]), (b, k)
            assert np.abs(want[k] - init_ci[k]).max() > 1e-6, (b, k)  # the step moved the CI
        assert (tmp_path / f"{b}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    t = tol("float64", "term")
    for k in ci["torch"]:
        a, b = ci["torch"][k], ci["jax"][k]
        assert np.abs(a - b).max() <= t.rel * max(np.abs(a).max(), t.floor), k
    assert TR.main(["--checkpoint", str(ck), "--backend", "torch", "--out", str(tmp_path / "x.png")]) == 2
    assert "unknown format" in capsys.readouterr().err


# ------------------------------------------------------------------ plots
def test_plot_case_writes_png(tmp_path):
    # guards: the trajectory plot writes a valid, non-empty PNG named after the case
    from parity.plots import plot_case
    oracle = [{"loss/0.faithfulness": 1.0 / (k + 1), "loss/total": 2.0 - 0.01 * k, "grad_norm/components": 1.0}
              for k in range(6)]
    jax_records = [{k: v * (1 + 1e-12) for k, v in r.items()} for r in oracle]
    path = plot_case(TRAJ, oracle, jax_records, tmp_path / "plots")
    assert path == tmp_path / "plots" / f"{TRAJ}.png"
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_tooling_test_wrote_into_the_repo_goldens(repo_goldens_before):
    # guards: every write above went to tmp; the committed goldens (the gate) and the lock
    # are byte- and mtime-identical to when this module's tests started
    assert G.GOLDENS == REPO_ROOT / "goldens" and L.LOCK_FILE == REPO_ROOT / "goldens" / "oracle.lock"
    assert _snapshot(REPO_ROOT / "goldens") == repo_goldens_before
