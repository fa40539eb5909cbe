"""Checkpoints crossing between the frameworks (SPEC S130-S133): parity/migrate.py,
parity/verify.py, and the `runtime.draws: contract` option both trainers honour.

- cross-framework resume (S132): the oracle trains k steps and saves, the checkpoint is
  migrated, the JAX trainer continues to step n; its losses at every step and its final
  state equal the oracle continuing by itself (float64, <= 1e-10 relative); the same
  JAX -> oracle. Cases: persistent PGD stopped inside the learning-rate warmup (after a
  faithfulness warmup), a stop inside the p-anneal window, and a checkpoint written right
  at the end of the faithfulness warmup (step 0: the oracle holds no AdamW state yet);
- the verifier (S133) catches a swapped V and U, a transposed tensor, a dropped optimizer
  moment, a missing source bundle, a wrong step counter and a wrong generator, each in the
  right group, and holds at most two leaves at a time;
- bad input to the migration (S130): a missing leaf, a wrong dtype, a truncated file, an
  unknown format, a config the destination refuses, a non-empty --out: one error naming
  it, the source untouched, nothing left at the destination;
- `runtime.draws` (S131): the default leaves every config dict and hash as before;
  `contract` makes each backend's production step take the parity feed's draws.

Tiny float64 TMS runs only (x64 is on for the parity suite, parity/conftest.py)."""
from __future__ import annotations

import copy
import json
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from contract import checkpoint_digest as cd
from contract.config import parse_config
from contract.data import batch_for_step
from contract.draws import draw_plan, sample_numpy
from contract.errors import CheckpointError
from loop.backends import make_backend
from loop.train import train
from parity.migrate import main as migrate_main, migrate
from parity.migrate_map import CI_FN, COMPONENTS, CONFIG, COUNTERS, OPTIM, SOURCES, MigrationError
from parity.verify import main as verify_main, verify
from tests.helpers import read_metrics, run_of, tms_config, write_tiny_tms

pytestmark = pytest.mark.xdist_group("migrate")  # one worker: the trained runs are shared fixtures
REL = 1e-10  # float64 cross-framework trajectories (parity/tolerances.py: terms agree to <= 1e-10)
PPGD = {"type": "persistent_pgd_recon", "coeff": 0.5, "scope": "c", "n_warmup": 1,
        "optimizer": {"type": "adam", "lr": {"start": 0.05}}}


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
    """XLA without its optimisations for this module (the properties tested do not depend on
    it; compile time dominates), restored afterwards (as tests/conftest.py's jax_fast_compiles)."""
    import jax
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)
    jax.clear_caches()


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    return write_tiny_tms(tmp_path_factory.mktemp("migrate_target"))


def case_config(weights: str, case: str) -> tuple[dict, int]:
    """(config, step k at which the source's checkpoint is migrated)."""
    base = tms_config(weights)
    common = dict(data={"feature_probability": 0.4}, runtime={"dtype": "float64", "draws": "contract"},
                  eval={"every": 0}, log_every=1)
    if case == "ppgd_lr_warmup":  # persistent PGD; stopped at k=2 inside the lr warmup (int(6*0.5) = 3 steps)
        lr = {"start": 1e-2, "warmup_pct": 0.5, "kind": "cosine", "final_frac": 0.1}
        cfg = tms_config(weights, **common, steps=6, checkpoint={"every": 2, "keep": 10},
                         faithfulness_warmup={"steps": 2, "lr": 1e-3},
                         loss_terms=base["loss_terms"] + [{"type": "stochastic_recon_subset", "coeff": 0.5}, PPGD],
                         optim={"components": {"lr": lr, "clip": 0.5}, "ci_fn": {"lr": lr}})
        return cfg, 2
    if case == "p_anneal":  # stopped at k=4 of 8 inside the p-anneal window [0.25, 0.75]
        terms = copy.deepcopy(base["loss_terms"])
        terms[1] |= {"pnorm": 1.5, "p_anneal_start_frac": 0.25, "p_anneal_end_frac": 0.75, "p_anneal_final_p": 0.7}
        cfg = tms_config(weights, **common, steps=8, checkpoint={"every": 4, "keep": 10}, loss_terms=terms + [PPGD],
                         optim={"components": {"lr": {"start": 1e-2}}, "ci_fn": {"lr": {"start": 1e-2, "kind": "linear"}}})
        return cfg, 4
    if case == "faithfulness_warmup_end":  # saved right after the faithfulness warmup, before step 0
        cfg = tms_config(weights, **common, steps=4, checkpoint={"every": 0, "keep": 10},
                         faithfulness_warmup={"steps": 3, "lr": 1e-2})
        return cfg, 0
    raise KeyError(case)


def train_source(backend: str, cfg: dict, k: int, out: Path) -> None:
    """Train `cfg` to the end with `backend` into `out`, leaving a checkpoint at step k."""
    run = run_of(cfg)
    if k == 0:  # what the loop saves when stopped before step 0: the state after the warmup
        b = make_backend(backend, run)
        state, warm = b.faithfulness_warmup(b.new_state())
        b.save_checkpoint(out, state, 0, {"faithfulness_warmup": {"steps": len(warm), "first": warm[0], "last": warm[-1]}})
        b.close()
    summary = train(make_backend(backend, run), out, progress=False)
    assert summary["step"] == cfg["steps"] and (k > 0 or summary["start_step"] == 0)


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(float(np.abs(a).max(initial=0.0)), float(np.abs(b).max(initial=0.0)))
    return 0.0 if scale == 0 else float(np.abs(a - b).max(initial=0.0)) / scale


def final_state_errors(a: Path, b: Path) -> float:
    """Worst relative error over every tensor pair of two checkpoints (one per framework),
    paired by the migration's links; counters must be equal."""
    from parity.migrate_io import open_checkpoint
    from parity.migrate_map import build_links, torch_opt_groups_of
    ra, rb = open_checkpoint(a), open_checkpoint(b)
    t, j = (ra, rb) if ra.family == "torch" else (rb, ra)
    run = run_of(ra.meta["config"])
    links = build_links(run, ra.meta["step"], ra.meta["dtype"], torch_opt_groups_of(t.leaves()))
    worst = 0.0
    for lk in links:
        if lk.kind == "tensor":
            assert lk.torch is not None
            worst = max(worst, rel_err(t.load(lk.torch), j.load(lk.jax[0])))
        elif lk.kind == "counter":
            assert lk.torch is not None
            assert int(t.load(lk.torch)) == int(j.load(lk.jax[0])), lk.name
    return worst


CASES = ["ppgd_lr_warmup", "p_anneal", "faithfulness_warmup_end"]


@pytest.mark.parametrize("src,dst", [("torch", "jax"), ("jax", "torch")], ids=["oracle_to_jax", "jax_to_oracle"])
@pytest.mark.parametrize("case", CASES)
def test_cross_framework_resume(case, src, dst, weights, tmp_path, record_property):
    # S132: the migrated run continues exactly as the source continues by itself
    cfg, k = case_config(weights, case)
    a = tmp_path / "A"
    train_source(src, cfg, k, a)
    path = migrate(ckpt(a, k), dst, tmp_path / "B")
    assert path == ckpt(tmp_path / "B", k)
    assert json.loads((tmp_path / "B" / "run.json").read_text())["backend"] == dst  # claimable by the destination
    summary = train(make_backend(dst, run_of(cfg)), tmp_path / "B", progress=False)
    assert summary["start_step"] == k and summary["step"] == cfg["steps"]
    ma, mb = read_metrics(a), read_metrics(tmp_path / "B")
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == list(range(cfg["steps"]))
    assert mb[:k] == ma[:k]  # the source's lines before the step travel with the migration
    worst = 0.0
    for la, lb in zip(ma[k:], mb[k:], strict=True):
        losses = sorted(x for x in la if x.startswith("loss/"))
        assert losses == sorted(x for x in lb if x.startswith("loss/")) and len(losses) >= 3
        for x in losses:
            e = rel_err(la[x], lb[x])
            assert e <= REL, f"step {la['step']} {x}: {la[x]!r} vs {lb[x]!r} (rel {e:.1e})"
            worst = max(worst, e)
    fin = final_state_errors(ckpt(a, cfg["steps"]), ckpt(tmp_path / "B", cfg["steps"]))
    assert fin <= REL, f"final state differs by {fin:.1e} relative"
    record_property("margins", f"{'migrate ' + case + ' ' + src + '->' + dst:40s} losses {worst:.1e}/{REL:.0e}  "
                               f"final state {fin:.1e}/{REL:.0e}")


def test_draws_contract_makes_production_take_the_parity_feed(weights):
    # S131: under `contract` a production step (no draws given) equals the step fed the
    # contract's plan explicitly; under `device` the backends draw themselves (differently)
    cfg, _ = case_config(weights, "p_anneal")
    run_c = run_of(cfg)
    dev = copy.deepcopy(cfg)
    dev["runtime"]["draws"] = "device"
    run_d = run_of(dev)
    batch = batch_for_step(run_c, 0, 0)
    feed = sample_numpy(draw_plan(run_c), 0, 0)
    for name in ("torch", "jax"):
        losses = {}
        for label, run, draws in (("contract", run_c, None), ("fed", run_c, feed), ("device", run_d, None)):
            b = make_backend(name, run)
            _, m = b.train_step(b.new_state(), 0, batch, draws)
            losses[label] = {x: v for x, v in b.host_metrics(m).items() if x.startswith("loss/")}
            b.close()
        assert losses["contract"] == losses["fed"], name
        assert losses["device"] != losses["contract"], name


def test_runtime_draws_default_keeps_config_dicts_and_hashes(weights):
    # S131: like the default guard (S106), the default draws are left out of the config's
    # dict and hash, so every config, golden and checkpoint written before the field stays valid
    d = tms_config(weights)
    base = parse_config(copy.deepcopy(d))
    assert base.runtime.draws == "device" and "draws" not in base.to_dict()["runtime"]
    explicit = parse_config(dict(copy.deepcopy(d), runtime={"draws": "device"}))
    assert explicit.to_dict() == base.to_dict() and explicit.hash() == base.hash()
    contract = parse_config(dict(copy.deepcopy(d), runtime={"draws": "contract"}))
    assert contract.to_dict()["runtime"]["draws"] == "contract" and contract.hash() != base.hash()
    assert parse_config(contract.to_dict()) == contract
    with pytest.raises(ValueError, match="runtime.draws"):
        parse_config(dict(copy.deepcopy(d), runtime={"draws": "numpy"}))


# ---------------------------------------------------------------------------- the verifier
@pytest.fixture(scope="module")
def pair(weights, tmp_path_factory):
    """A JAX run with persistent PGD saved at step 2 and its migration to the oracle:
    (JAX checkpoint, oracle checkpoint)."""
    d = tmp_path_factory.mktemp("migrate_pair")
    cfg, _ = case_config(weights, "ppgd_lr_warmup")
    cfg = dict(cfg, steps=2)
    train(make_backend("jax", run_of(cfg)), d / "A", progress=False)
    return ckpt(d / "A", 2), migrate(ckpt(d / "A", 2), "torch", d / "B")


def tamper_torch(path: Path, out: Path, change=None, meta=None) -> Path:
    """A copy of the oracle checkpoint dir `path` at `out/checkpoints/<step dir>` with its
    tensors changed by `change(dict)` and its meta.json by `meta(dict)`, digest rewritten
    (a consistent but wrong checkpoint, as a buggy migration would write)."""
    dst = out / "checkpoints" / path.name
    shutil.copytree(path, dst)
    f = dst / "state.safetensors"
    if change is not None:
        t = load_file(str(f))
        change(t)
        save_file(t, str(f))
    if meta is not None:
        m = json.loads((dst / "meta.json").read_text())
        meta(m)
        (dst / "meta.json").write_text(json.dumps(m, indent=1, sort_keys=True) + "\n")
    (dst / "digest.json").unlink()
    cd.write_digest(dst, json.loads((dst / "meta.json").read_text())["step"])
    return dst


def failing(rep) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in rep.rows:
        if not r.ok:
            out.setdefault(r.group, []).append(r)
    return out


def test_verifier_passes_a_migration_and_prints_every_group(pair, capsys):
    src, dst = pair
    lines: list[str] = []
    assert verify_main([str(src), str(dst)], out=lines.append) == 0
    for g in (COMPONENTS, CI_FN, OPTIM, SOURCES, COUNTERS, CONFIG):
        assert any(line.startswith(f"PASS  {g}") for line in lines), (g, lines)
    assert lines[-1].startswith("verdict: PASS")
    assert verify(dst, src).passed  # either order


def swap_v_u(t: dict) -> None:
    t["components.linear1.V"], t["components.linear1.U"] = t["components.linear1.U"], t["components.linear1.V"]


def transpose(name: str):
    def f(t: dict) -> None:
        t[name] = np.ascontiguousarray(t[name].T)
    return f


def drop(*names: str):
    def f(t: dict) -> None:
        for n in names:
            del t[n]
    return f


def drop_bundle(t: dict) -> None:
    for n in [n for n in t if "t4" in n.split(".")]:
        del t[n]


def wrong_step(t: dict) -> None:
    t["step"] = np.asarray(3, np.int64)


def wrong_generator(m: dict) -> None:
    m["extra"]["migrated_from"]["generator"] = "torch"


@pytest.mark.parametrize("what,change,meta,group,status,leaf", [
    ("swapped_V_U", swap_v_u, None, COMPONENTS, "SHAPE DIFFERS", "components.linear1.V"),
    ("transposed", transpose("components.linear1.V"), None, COMPONENTS, "TRANSPOSED", "components.linear1.V"),
    ("transposed_square", transpose("ci_fn.linear1.b0"), None, CI_FN, "TRANSPOSED", "ci_fn.linear1.b0"),
    ("dropped_moment", drop("opt.components.exp_avg_sq.components.linear2.U"), None, OPTIM, "MISSING",
     "opt.components.exp_avg_sq.components.linear2.U"),
    ("missing_bundle", drop_bundle, None, SOURCES, "MISSING", "sources.t4.linear1"),
    ("wrong_step", wrong_step, None, COUNTERS, "VALUES DIFFER", "step"),
    ("wrong_generator", None, wrong_generator, CONFIG, "VALUES DIFFER", "generator"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_verifier_catches(what, change, meta, group, status, leaf, pair, tmp_path):
    src, dst = pair
    bad = tamper_torch(dst, tmp_path / "bad", change, meta)
    rep = verify(src, bad)
    fails = failing(rep)
    assert not rep.passed
    expected = {group} if what != "missing_bundle" else {SOURCES, OPTIM, COUNTERS}  # a bundle has moments and a counter
    assert set(fails) == expected, {g: [(r.name, r.status) for r in rs] for g, rs in fails.items()}
    assert any(r.status == status and leaf in r.name for r in fails[group]), [(r.name, r.status) for r in fails[group]]
    if what == "swapped_V_U":
        assert any("V and U swapped" in r.detail for r in fails[group])
    lines: list[str] = []
    assert verify_main([str(src), str(bad)], out=lines.append) == 1
    assert any(line.startswith(f"FAIL  {group}") for line in lines) and lines[-1].startswith("verdict: FAIL")


def test_verifier_catches_a_swap_in_an_orbax_checkpoint(pair, tmp_path):
    # the JAX side read through orbax's single-array restore: V and U of a site swapped in a
    # JAX checkpoint written by the JAX trainer's own save
    from jax_impl import checkpoint as jck
    src_jax, dst_torch = pair
    state, meta, run = jck.load_run_checkpoint(src_jax)
    p = dict(state.params)
    p["components.linear2.V"], p["components.linear2.U"] = p["components.linear2.U"], p["components.linear2.V"]
    bad = jck.save_checkpoint(tmp_path / "J", state.replace(params=p), run, 2, 1, np.float64, meta["extra"])
    rep = verify(dst_torch, bad)
    fails = failing(rep)
    assert set(fails) == {COMPONENTS}, fails
    assert {r.name.split(" ")[0] for r in fails[COMPONENTS]} == {"components.linear2.V", "components.linear2.U"}
    assert all("V and U swapped" in r.detail for r in fails[COMPONENTS])


def track_leaf_loads(monkeypatch, readers) -> list[int]:
    """Patch each reader's `load` to track the arrays it hands out that are still alive;
    returns a one-item list holding the peak of their total bytes."""
    live: dict[int, int] = {}
    peak = [0]

    def tracked(orig):
        def load(self, name):
            a = orig(self, name)
            live[id(a)] = a.nbytes
            weakref.finalize(a, live.pop, id(a), None)
            peak[0] = max(peak[0], sum(live.values()))
            return a
        return load

    for cls in readers:
        monkeypatch.setattr(cls, "load", tracked(cls.load))
    return peak


def test_verifier_holds_two_leaves_at_a_time(pair, monkeypatch):
    # S133: leaf pairs are loaded one at a time; track every array the readers hand out
    import parity.migrate_io as io
    peak = track_leaf_loads(monkeypatch, (io.SafetensorsReader, io.OrbaxReader))
    src, dst = pair
    assert verify(src, dst).passed
    biggest = max(int(np.prod(li.shape)) * np.dtype(li.dtype).itemsize for li in io.open_checkpoint(src).leaves().values())
    assert 0 < peak[0] <= 2 * biggest, (peak[0], biggest)
    peak[0] = 0
    assert verify(src, dst, load_all=True).passed  # the load-everything comparison holds the trees
    assert peak[0] > 10 * biggest


# ---------------------------------------------------------------------------- bad input
def snapshot(d: Path) -> dict[str, tuple[str, float]]:
    return {str(p.relative_to(d)): (cd.file_sha256(p), p.stat().st_mtime) for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def oracle_ck(weights, tmp_path_factory):
    d = tmp_path_factory.mktemp("migrate_oracle")
    cfg, _ = case_config(weights, "ppgd_lr_warmup")
    cfg = dict(cfg, steps=2)
    train(make_backend("torch", run_of(cfg)), d / "A", progress=False)
    return ckpt(d / "A", 2)


def set_field(path: tuple, value):
    def f(m: dict) -> None:
        d = m
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return f


@pytest.mark.parametrize("what,change,meta,needle", [
    ("missing_leaf", drop("opt.ci_fn.exp_avg.ci_fn.linear2.w1"), None, "'opt.ci_fn.exp_avg.ci_fn.linear2.w1'"),
    ("wrong_dtype", lambda t: t.update({"components.linear2.U": t["components.linear2.U"].astype(np.float32)}), None,
     "'components.linear2.U' is float32, expected float64"),
    ("unknown_format", None, set_field(("format",), "vpd-torch-oracle-checkpoint/9"), "format 'vpd-torch-oracle-checkpoint/9'"),
    ("bad_config", None, set_field(("config", "sites", 0, "C"), 0), "sites.0.C"),
])
def test_migration_refuses_bad_input(what, change, meta, needle, oracle_ck, tmp_path, capsys):
    src = tamper_torch(oracle_ck, tmp_path / "src", change, meta)
    before = snapshot(src.parent.parent)
    with pytest.raises(MigrationError) as e:
        migrate(src, "jax", tmp_path / "out")
    assert needle in str(e.value)
    assert migrate_main([str(src), "--to", "jax", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("parity.migrate: error: ") and needle in err[0]
    assert snapshot(src.parent.parent) == before  # the source is only read
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no destination, no temp dir


def test_migration_refuses_a_truncated_file(oracle_ck, tmp_path, capsys):
    src = tmp_path / "src" / "checkpoints" / oracle_ck.name
    shutil.copytree(oracle_ck, src)
    f = src / "state.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    before = snapshot(src)
    with pytest.raises(CheckpointError, match=r"state\.safetensors"):
        migrate(src, "jax", tmp_path / "out")
    assert migrate_main([str(src), "--to", "jax", "--out", str(tmp_path / "out")]) == 5
    assert "state.safetensors" in capsys.readouterr().err
    assert snapshot(src) == before and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_migration_refuses_a_config_the_destination_refuses(weights, tmp_path):
    # a JAX bf16 run (fp32 masters) cannot continue on the oracle (fp32/fp64 only): refused, naming the field
    cfg = tms_config(weights, runtime={"dtype": "bf16", "draws": "contract"})
    b = make_backend("jax", run_of(cfg))
    src = b.save_checkpoint(tmp_path / "src", b.new_state(), 0, {})
    b.close()
    before = snapshot(src)
    with pytest.raises(MigrationError, match=r"runtime\.dtype.*bf16"):
        migrate(src, "torch", tmp_path / "out")
    assert snapshot(src) == before and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_migration_refuses_a_nonempty_out_and_its_own_format(oracle_ck, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(MigrationError, match="not an empty directory"):
        migrate(oracle_ck, "jax", out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    with pytest.raises(MigrationError, match="already a torch checkpoint"):
        migrate(oracle_ck, "torch", tmp_path / "o2")
    assert not (tmp_path / "o2").exists()


def test_migration_into_an_empty_dir_round_trips_bit_for_bit(oracle_ck, tmp_path):
    # oracle -> JAX -> oracle gives back every tensor of the source, bit for bit
    (tmp_path / "J").mkdir()
    j = migrate(oracle_ck, "jax", tmp_path / "J")
    t = migrate(j, "torch", tmp_path / "T")
    a, b = load_file(str(oracle_ck / "state.safetensors")), load_file(str(t / "state.safetensors"))
    assert sorted(a) == sorted(b)
    for n in a:
        assert a[n].dtype == b[n].dtype and a[n].tobytes() == b[n].tobytes(), n
    rec = json.loads((t / "meta.json").read_text())["extra"]["migrated_from"]
    assert rec["backend"] == "jax" and rec["previous"]["backend"] == "torch_oracle"
