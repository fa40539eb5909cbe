"""The oracle's sharded checkpoints (FSDP2 on N ranks, torch.distributed.checkpoint) crossing
to the JAX trainer and back (SPEC S134-S137): parity/migrate_io.py's `DcpReader`,
`parity.migrate --mesh-data`, `parity.verify` on every pair of formats.

One oracle run on 2 ranks (the real launcher: `python -m oracle_torch.cli train` in a
subprocess, torchrun inside) is trained once for the module, float64 under
`runtime.draws: contract`, with persistent PGD on per-position (`bsc`) sources, so the
sources are sharded over the batch rows and the parameters over dim 0:
- its step-2 checkpoint is migrated to JAX (one device), verified, and continued there to
  step 6: every step's losses and the final state equal the 2-rank oracle's own run;
- the JAX run's step-4 checkpoint is migrated back to the oracle's sharded format for 2
  ranks (written whole by one process), verified, and the oracle resumes it on 2 ranks:
  steps 4-5 and the final state equal the oracle's own run;
- the oracle's two formats convert into each other (identity copy, verified, round trip
  bit for bit); a DCP leaf is read alone (only its key's chunks); tampered and damaged DCP
  checkpoints are caught naming the leaf or file, the source untouched, nothing left behind."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from contract import checkpoint_digest as cd
from contract.errors import CheckpointError
from loop.backends import make_backend
from loop.train import train
from parity.migrate import main as migrate_main, migrate
from parity.migrate_io import ORACLE_DCP_FORMAT, ORACLE_FORMAT, DcpReader, open_checkpoint
from parity.migrate_map import COMPONENTS, OPTIM, MigrationError
from parity.verify import main as verify_main, verify
from tests.helpers import read_metrics, run_of, tms_config, write_cfg, write_tiny_tms

pytestmark = pytest.mark.xdist_group("migrate_sharded")  # one worker: the trained runs are shared fixtures
REL = 1e-10  # float64 cross-framework trajectories (as parity/test_migrate.py)
REPO = Path(__file__).resolve().parent.parent
STEPS, K_TO_JAX, K_TO_ORACLE = 6, 2, 4
PPGD_BSC = {"type": "persistent_pgd_recon", "coeff": 0.5, "scope": "bsc", "n_warmup": 1,
            "optimizer": {"type": "adam", "lr": {"start": 0.05}}}


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
    """XLA without its optimisations for this module (as parity/test_migrate.py)."""
    import jax
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)
    jax.clear_caches()


def config(weights: str, mesh: int) -> dict:
    base = tms_config(weights)
    return tms_config(weights, data={"feature_probability": 0.4}, eval={"every": 0}, log_every=1, steps=STEPS,
                      runtime={"dtype": "float64", "draws": "contract", "mesh": {"data": mesh}},
                      checkpoint={"every": 2, "keep": 10}, loss_terms=base["loss_terms"] + [PPGD_BSC],
                      optim={"components": {"lr": {"start": 1e-2}}, "ci_fn": {"lr": {"start": 1e-2, "kind": "linear"}}})


def oracle_cli_train(cfg_path: str, out: Path) -> None:
    """`python -m oracle_torch.cli train CONFIG --out OUT` (it starts the config's ranks itself)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "oracle_torch.cli", "train", cfg_path, "--out", str(out), "--quiet"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"oracle on 2 ranks: exit {p.returncode}\nstderr:\n{p.stderr[-4000:]}"


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(float(np.abs(a).max(initial=0.0)), float(np.abs(b).max(initial=0.0)))
    return 0.0 if scale == 0 else float(np.abs(a - b).max(initial=0.0)) / scale


def state_error(a: Path, b: Path) -> float:
    """Worst relative error over the tensor pairs of two checkpoints of one run (any two
    formats), paired by the migration's links; counters must be equal."""
    from parity.migrate_map import build_links, torch_opt_groups_of
    ra, rb = open_checkpoint(a), open_checkpoint(b)
    t = ra if ra.family == "torch" else rb
    links = build_links(run_of(ra.meta["config"]), ra.meta["step"], ra.meta["dtype"], torch_opt_groups_of(t.leaves()))

    def leaf(r, lk) -> str:
        out = lk.torch if r.family == "torch" else lk.jax[0]
        assert out is not None
        return out
    worst = 0.0
    for lk in links:
        if lk.kind == "tensor":
            worst = max(worst, rel_err(ra.load(leaf(ra, lk)), rb.load(leaf(rb, lk))))
        elif lk.kind == "counter":
            assert int(ra.load(leaf(ra, lk))) == int(rb.load(leaf(rb, lk))), lk.name
    ra.close()
    rb.close()
    return worst


def loss_error(ma: list[dict], mb: list[dict], steps: range) -> float:
    """Worst relative error of every `loss/*` metric at `steps` (both runs log the same set)."""
    worst = 0.0
    by_a, by_b = {m["step"]: m for m in ma}, {m["step"]: m for m in mb}
    for s in steps:
        la, lb = by_a[s], by_b[s]
        losses = sorted(x for x in la if x.startswith("loss/"))
        assert losses == sorted(x for x in lb if x.startswith("loss/")) and len(losses) >= 4, (s, losses)
        for x in losses:
            e = rel_err(la[x], lb[x])
            assert e <= REL, f"step {s} {x}: {la[x]!r} vs {lb[x]!r} (rel {e:.1e})"
            worst = max(worst, e)
    return worst


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The 2-rank oracle run A (DCP checkpoints at 2, 4, 6) and the configs."""
    d = tmp_path_factory.mktemp("migrate_sharded")
    w = write_tiny_tms(d)
    cfg2, cfg1 = config(w, 2), config(w, 1)
    cfg2_path = write_cfg(d / "cfg2.yaml", cfg2)
    oracle_cli_train(cfg2_path, d / "A")
    assert json.loads((ckpt(d / "A", 2) / "meta.json").read_text())["world_size"] == 2
    return {"dir": d, "A": d / "A", "cfg1": cfg1, "cfg2": cfg2, "cfg2_path": cfg2_path}


@pytest.fixture(scope="module")
def on_jax(runs) -> Path:
    """A's step-2 checkpoint migrated to JAX on one device, continued there to the end."""
    b = runs["dir"] / "B"
    path = migrate(ckpt(runs["A"], K_TO_JAX), "jax", b, mesh_data=1)
    assert path == ckpt(b, K_TO_JAX)
    summary = train(make_backend("jax", run_of(runs["cfg1"])), b, progress=False)
    assert summary["start_step"] == K_TO_JAX and summary["step"] == STEPS
    return b


def test_dcp_reader_lists_and_loads_one_key_at_a_time(runs, monkeypatch):
    # the DCP adapter: names, global shapes and dtypes from .metadata; one key loaded whole
    # (no process group), reading only that key's chunks from the 2 ranks' files
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    from oracle_torch import sharded_checkpoint as sc
    src = ckpt(runs["A"], 2)
    assert ORACLE_DCP_FORMAT == sc.DCP_FORMAT
    r = open_checkpoint(src)
    assert isinstance(r, DcpReader) and r.family == "torch" and r.fmt == ORACLE_DCP_FORMAT
    whole = sc.read_whole(src)
    info = r.leaves()
    assert sorted(info) == sorted(whole)
    read: list[tuple[str, str]] = []
    orig = FileSystemReader.read_data

    def spy(self, plan, planner):
        read.extend((it.storage_index.fqn, self.storage_data[it.storage_index].relative_path) for it in plan.items)
        return orig(self, plan, planner)
    monkeypatch.setattr(FileSystemReader, "read_data", spy)
    for n, t in whole.items():
        assert info[n].shape == tuple(t.shape) and info[n].dtype == str(t.numpy().dtype), n
        read.clear()
        a = r.load(n)
        assert a.dtype == t.numpy().dtype and a.tobytes() == t.numpy().tobytes(), n
        assert {fqn for fqn, _ in read} == {n}, (n, read)
    sharded = "components.linear2.U"  # a parameter sharded on dim 0: one chunk in each rank's file
    read.clear()
    r.load(sharded)
    assert sorted(f for _, f in read) == ["__0_0.distcp", "__1_0.distcp"]
    with pytest.raises(MigrationError, match="no leaf 'components.nope'"):
        r.load("components.nope")


def test_oracle_on_two_ranks_continues_on_jax(runs, on_jax, record_property):
    # S135: a 2-rank oracle checkpoint (DCP) migrated to one JAX device continues exactly as
    # the 2-rank oracle continues by itself
    a, b = runs["A"], on_jax
    lines: list[str] = []
    assert verify_main([str(ckpt(a, K_TO_JAX)), str(ckpt(b, K_TO_JAX))], out=lines.append) == 0, lines
    assert lines[-1].startswith("verdict: PASS")
    meta = json.loads((ckpt(b, K_TO_JAX) / "meta.json").read_text())
    from jax_impl.train import prng_impl
    assert meta["config"]["runtime"]["mesh"]["data"] == 1 and meta["prng_impl"] == prng_impl(1)
    assert meta["extra"]["migrated_from"]["format"] == ORACLE_DCP_FORMAT
    ma, mb = read_metrics(a), read_metrics(b)
    assert [m["step"] for m in mb] == list(range(STEPS)) and mb[:K_TO_JAX] == ma[:K_TO_JAX]
    losses = loss_error(ma, mb, range(K_TO_JAX, STEPS))
    fin = state_error(ckpt(a, STEPS), ckpt(b, STEPS))
    assert fin <= REL, f"final state differs by {fin:.1e} relative"
    record_property("margins", f"{'migrate dcp(2 ranks)->jax':40s} losses {losses:.1e}/{REL:.0e}  final state {fin:.1e}/{REL:.0e}")


def test_jax_continues_on_two_oracle_ranks(runs, on_jax, record_property):
    # S135/S136: the JAX run's checkpoint written as the oracle's sharded format for 2 ranks
    # (one file, whole tensors) resumes on 2 ranks and continues as the oracle by itself
    c = runs["dir"] / "C"
    src = ckpt(on_jax, K_TO_ORACLE)
    path = migrate(src, "torch", c, mesh_data=2)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format"] == ORACLE_DCP_FORMAT and meta["world_size"] == 2
    assert meta["config"] == run_of(runs["cfg2"]).cfg.to_dict()  # the source's config, on 2 ranks again
    assert sorted(p.name for p in path.iterdir()) == [".metadata", "__0_0.distcp", "digest.json", "meta.json"]
    assert verify(src, path).passed and verify(path, src).passed
    oracle_cli_train(runs["cfg2_path"], c)
    ma, mc = read_metrics(runs["A"]), read_metrics(c)
    assert [m["step"] for m in mc] == list(range(STEPS))
    losses = loss_error(ma, mc, range(K_TO_ORACLE, STEPS))
    fin = state_error(ckpt(runs["A"], STEPS), ckpt(c, STEPS))
    assert fin <= REL, f"final state differs by {fin:.1e} relative"
    record_property("margins", f"{'migrate jax->dcp(2 ranks)':40s} losses {losses:.1e}/{REL:.0e}  final state {fin:.1e}/{REL:.0e}")


def test_oracle_formats_convert_into_each_other(runs, tmp_path):
    # the oracle's two formats: DCP -> one-process -> DCP, verified each way, bit for bit
    from oracle_torch import sharded_checkpoint as sc
    src = ckpt(runs["A"], 2)
    one = migrate(src, "torch", tmp_path / "one", mesh_data=1)
    assert json.loads((one / "meta.json").read_text())["format"] == ORACLE_FORMAT
    assert verify(src, one).passed and verify(one, src).passed
    back = migrate(one, "torch", tmp_path / "back", mesh_data=2)
    assert verify(one, back).passed
    a, b = sc.read_whole(src), sc.read_whole(back)
    assert sorted(a) == sorted(b)
    for n in a:
        assert a[n].dtype == b[n].dtype and a[n].numpy().tobytes() == b[n].numpy().tobytes(), n
    with pytest.raises(MigrationError, match="already a torch checkpoint.*--mesh-data"):
        migrate(src, "torch", tmp_path / "same")
    with pytest.raises(MigrationError, match="already a torch checkpoint"):
        migrate(src, "torch", tmp_path / "same", mesh_data=2)  # DCP again: the oracle reshards itself
    assert not (tmp_path / "same").exists()


def test_verifier_streams_dcp_one_leaf_pair_at_a_time(runs, on_jax, monkeypatch):
    # S137: with a DCP side the verifier still holds about two leaves, never a tree
    import parity.migrate_io as io
    from parity.test_migrate import track_leaf_loads
    peak = track_leaf_loads(monkeypatch, (io.DcpReader, io.OrbaxReader))
    src, dst = ckpt(runs["A"], K_TO_JAX), ckpt(on_jax, K_TO_JAX)
    assert verify(src, dst).passed
    biggest = max(int(np.prod(li.shape)) * np.dtype(li.dtype).itemsize for li in open_checkpoint(src).leaves().values())
    assert 0 < peak[0] <= 2 * biggest, (peak[0], biggest)


# ---------------------------------------------------------------------------- tampered / damaged DCP
def tamper_dcp(path: Path, out: Path, change=None, meta=None) -> Path:
    """A copy of the DCP checkpoint `path` at `out/checkpoints/<step dir>` with its tensors
    changed by `change(dict)` (rewritten whole by one process) and its meta.json by
    `meta(dict)`, digest rewritten: consistent but wrong, as a buggy migration would write."""
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    from oracle_torch import sharded_checkpoint as sc
    dst = out / "checkpoints" / path.name
    dst.mkdir(parents=True)
    t = sc.read_whole(path)
    if change is not None:
        change(t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_save(t, checkpoint_id=str(dst), no_dist=True)
    m = json.loads((path / "meta.json").read_text())
    if meta is not None:
        meta(m)
    (dst / "meta.json").write_text(json.dumps(m, indent=1, sort_keys=True) + "\n")
    cd.write_digest(dst, m["step"])
    return dst


def snapshot(d: Path) -> dict[str, tuple[str, float]]:
    return {str(p.relative_to(d)): (cd.file_sha256(p), p.stat().st_mtime) for p in sorted(d.rglob("*")) if p.is_file()}


def swap_v_u(t: dict) -> None:
    t["components.linear1.V"], t["components.linear1.U"] = t["components.linear1.U"], t["components.linear1.V"]


def drop_moment(t: dict) -> None:
    del t["opt.components.exp_avg_sq.components.linear2.U"]


@pytest.mark.parametrize("what,change,group,status,leaf", [
    ("swapped_V_U", swap_v_u, COMPONENTS, "SHAPE DIFFERS", "components.linear1.V"),
    ("dropped_moment", drop_moment, OPTIM, "MISSING", "opt.components.exp_avg_sq.components.linear2.U"),
], ids=["swapped_V_U", "dropped_moment"])
def test_verifier_catches_a_tampered_dcp_checkpoint(what, change, group, status, leaf, runs, on_jax, tmp_path):
    bad = tamper_dcp(ckpt(runs["A"], K_TO_JAX), tmp_path / "bad", change)
    rep = verify(ckpt(on_jax, K_TO_JAX), bad)
    fails = {r.group for r in rep.rows if not r.ok}
    assert fails == {group}, [(r.name, r.status) for r in rep.rows if not r.ok]
    assert any(r.status == status and leaf in r.name for r in rep.rows if not r.ok)


def test_migration_refuses_a_damaged_or_incomplete_dcp_checkpoint(runs, tmp_path, capsys):
    # a missing leaf, a truncated shard file (the digest), a shard truncated under a
    # rewritten digest (DCP's own read), a mesh the config refuses: one error naming it,
    # the source untouched, nothing at the destination
    src = ckpt(runs["A"], 2)
    missing = tamper_dcp(src, tmp_path / "missing", drop_moment)
    trunc = tmp_path / "trunc" / "checkpoints" / src.name
    shutil.copytree(src, trunc)
    f = trunc / "__1_0.distcp"
    f.write_bytes(f.read_bytes()[:-200])
    redigested = tmp_path / "redigested" / "checkpoints" / src.name
    shutil.copytree(trunc, redigested)
    (redigested / "digest.json").unlink()
    cd.write_digest(redigested, 2)
    cases = [(missing, "jax", None, MigrationError, 2, "'opt.components.exp_avg_sq.components.linear2.U'"),
             (trunc, "jax", None, CheckpointError, 5, "__1_0.distcp"),
             (redigested, "jax", None, CheckpointError, 5, "unreadable from its DCP shards"),
             (src, "torch", 4, MigrationError, 2, "batch_size: 6 is not divisible by runtime.mesh.data (4)")]
    for ck, to, mesh, exc, code, needle in cases:
        root = ck.parent.parent
        before = snapshot(root)
        out = tmp_path / f"out_{root.name}"
        with pytest.raises(exc) as e:
            migrate(ck, to, out, mesh_data=mesh)
        assert needle in str(e.value), (ck, str(e.value))
        argv = [str(ck), "--to", to, "--out", str(out)] + (["--mesh-data", str(mesh)] if mesh else [])
        assert migrate_main(argv) == code
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("parity.migrate: error: ") and needle in err[0], err
        assert snapshot(root) == before  # the source is only read
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(f".out_{root.name}")]


def test_mesh_data_changes_only_where_the_run_runs(runs, tmp_path):
    # the destination's config differs from the source's in runtime.mesh alone; its hash is its own
    from contract.checkpoint_meta import computed
    src = ckpt(runs["A"], 2)
    one = migrate(src, "torch", tmp_path / "one", mesh_data=1)
    sm, dm = (json.loads((p / "meta.json").read_text()) for p in (src, one))
    assert computed(sm["config"]) == computed(dm["config"]) and sm["config"] != dm["config"]
    assert dm["config_hash"] == run_of(copy.deepcopy(dm["config"])).cfg.hash() != sm["config_hash"]
    assert json.loads((tmp_path / "one" / "run.json").read_text())["config_hash"] == dm["config_hash"]
