"""Data-parallel invariance (SPEC S91): the JAX trajectory of a case is the same on 1 and 4
simulated CPU devices, one subprocess per device count (the count must be set before JAX
starts); every other mesh, 2-D ones and 2 processes: tests/test_jax_mesh_invariance.py
(`-m mesh_invariance`, not in the default run). Cases include imp-min with beta (global sums
inside the log), a shared-scope persistent source (gradient of the global mean) and subset
routing."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from contract.config import parse_config
from contract.resolve import resolve_run
from contract.targets import REPO_ROOT

SCRIPT = r"""
import json, sys
import jax
from parity.cases import CASES
from parity.runners import make_inputs, run_jax
from contract.config import parse_config
from contract.resolve import resolve_run
name, n = sys.argv[1], int(sys.argv[2])
case = CASES[name]
d = case.config_dict()
d["runtime"]["mesh"] = {"data": n}
run = resolve_run(parse_config(d))
assert len(jax.devices()) == n, jax.devices()
records, _, _ = run_jax(make_inputs(run, case.precision, 12), grads_at_step0=False)
print(json.dumps(records))
"""


def trajectory(name: str, n: int) -> list[dict]:
    env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", PYTHONPATH=str(REPO_ROOT))
    p = subprocess.run([sys.executable, "-c", SCRIPT, name, str(n)], env=env, cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["traj_tms_ppgd.64", "traj_resid.64"])
def test_trajectory_invariant_to_device_count(name):
    # guards S91, S22 (global imp-min sums), S81 (shared-scope source gradients), S62; traj_resid
    # stacks a routed and an unrouted forward along the sharded batch axis (S28b)
    ref = trajectory(name, 1)
    for n in (4,):  # 2 and 8 devices (and 2-D meshes): the mesh_invariance suite
        got = trajectory(name, n)
        assert len(got) == len(ref)
        for k, (a, b) in enumerate(zip(ref, got, strict=True)):
            assert set(a) == set(b)
            for key in a:
                err = abs(a[key] - b[key]) / max(abs(a[key]), abs(b[key]), 1e-12)
                assert err <= 1e-10, f"{n} devices, step {k}, {key}: {b[key]!r} vs 1 device {a[key]!r} (rel {err:.1e})"


PRODUCTION_SCRIPT = r"""
import json, sys
from jax_impl.cli import main
cfg, out = sys.argv[1], sys.argv[2]
rc = main(["train", cfg, "--out", out, "--no-resume", "--quiet"])
print(json.dumps({"rc": rc}))
"""


def test_production_train_runs_on_a_two_device_mesh(tmp_path):
    # S50/S91/S143: the production path (draws sampled inside the jitted step, eval draws from
    # eval_key) compiles and trains on a mesh; XLA cannot partition Philox, so this guards the
    # generator choice (one partitionable generator on every mesh), for the step and the eval
    import yaml

    c = yaml.safe_load((REPO_ROOT / "configs" / "tms_5-2.yaml").read_text())
    c["target"]["weights"] = str(REPO_ROOT / c["target"]["weights"])
    c |= {"steps": 4, "batch_size": 8, "log_every": 1, "faithfulness_warmup": {"steps": 2, "lr": 1e-3},
          "eval": {"every": 2, "batch_size": 8}, "checkpoint": {"every": 2, "keep": 1},
          "runtime": {"mesh": {"data": 2}}}
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(yaml.safe_dump(c))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=str(REPO_ROOT), WANDB_MODE="disabled")
    env.pop("JAX_ENABLE_X64", None)
    p = subprocess.run([sys.executable, "-c", PRODUCTION_SCRIPT, str(cfg), str(tmp_path / "out")], env=env,
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == {"rc": 0}
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if "loss/total" in x]
    evals = [x for x in lines if any(k.startswith("eval/") for k in x)]
    assert [x["step"] for x in train] == [0, 1, 2, 3]
    assert [x["step"] for x in evals] == [0, 2, 4]
    for x in lines:
        bad = {k: v for k, v in x.items() if isinstance(v, float) and not v == v}
        assert not bad, (x["step"], bad)


def test_state_specs_shard_every_component_axis():
    # S140: every leaf with a C axis (V, U, the CI function's per-component and output-layer
    # parameters, their Adam moments) is sharded over `components` on that axis, every other
    # leaf replicated but per-position sources (over `data`); check_layout names leaf and sizes
    import jax
    from jax.sharding import PartitionSpec as P

    from jax_impl.mesh import check_layout, leaf_name, state_specs
    from jax_impl.state import abstract_tree
    from parity.mesh_invariance import config_dict

    for name, ci_leaves in (("llama_subset", {"w1": (1,), "b1": (0,)}), ("tms_ppgd", {"w0": (0,), "b0": (0,), "w1": (0,),
                                                                                     "b1": (0,)})):
        run = resolve_run(parse_config(config_dict(name, "float32", (2, 2))))
        tree = abstract_tree(run, "float32")
        specs = jax.tree.leaves(state_specs(run, tree), is_leaf=lambda x: isinstance(x, P))
        for (path, x), spec in zip(jax.tree_util.tree_leaves_with_path(tree), specs, strict=True):
            n = leaf_name(path)
            sharded = tuple(i for i, a in enumerate(spec) if a == "components")
            if ".components." in n:
                assert sharded == ((1,) if n.endswith(".V") else (0,)), (n, spec)
            elif ".ci_fn." in n:
                assert sharded == ci_leaves.get(n.rsplit(".", 1)[1], ()), (n, spec)
                assert all(x.shape[i] == 8 for i in sharded), (n, x.shape)
            else:
                assert sharded == (), (n, spec)
            if ("sources" in n or "source_opt" in n) and ".m." not in n and ".v." not in n and n.startswith("sources"):
                bsc = x.shape[0] == 8  # the per-position bundle: [B, C + 1]
                assert (spec[0] == "data") == bsc, (n, spec)
        with pytest.raises(ValueError, match=r"runtime\.mesh\.components: the state leaf params\.components\.\S+\.U has 8 "
                                             r"along dimension 0 .* not divisible by components = 3"):
            check_layout(run, tree, 2, 3)


REMAT_SCRIPT = r"""
import json, sys
from parity.cases import CASES
from parity.runners import make_inputs, run_jax
from contract.config import parse_config
from contract.resolve import resolve_run
d = CASES["traj_tms_ppgd.64"].config_dict()
d["runtime"]["remat"] = sys.argv[1]
run = resolve_run(parse_config(d))
records, grads, _ = run_jax(make_inputs(run, "float64", 3))
print(json.dumps({"records": records, "grads": {k: v.ravel().tolist() for k, v in grads.items()}}))
"""


def test_remat_changes_memory_not_numbers():
    # S144: the rematerialised masked forwards (persistent-PGD ascents and losses, stochastic
    # recon) give the step-0 gradients and a 3-step trajectory of the plain step (float64)
    import numpy as np

    out = {}
    for policy in ("off", "nothing_saveable"):
        env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
        env.pop("XLA_FLAGS", None)
        p = subprocess.run([sys.executable, "-c", REMAT_SCRIPT, policy], env=env, cwd=REPO_ROOT, capture_output=True,
                           text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        out[policy] = json.loads(p.stdout.strip().splitlines()[-1])
    a, b = out["off"], out["nothing_saveable"]
    for k, g in a["grads"].items():
        x, y = np.asarray(g), np.asarray(b["grads"][k])
        assert np.abs(x - y).max() <= 1e-12 * max(np.linalg.norm(x), 1e-300), k
    for ra, rb in zip(a["records"], b["records"], strict=True):
        for k in ra:
            assert abs(ra[k] - rb[k]) <= 1e-10 * max(abs(ra[k]), abs(rb[k]), 1e-12), k


@pytest.mark.parametrize("runtime,field", [({"mesh": {"components": 2}}, "runtime.mesh.components"),
                                           ({"remat": "nothing_saveable"}, "runtime.remat")])
def test_oracle_refuses_jax_only_runtime_fields(runtime, field):
    # S93/S140/S144: the oracle neither shards components nor rematerialises: refused by name
    from contract.config import ConfigError
    from loop.backends import make_backend
    from parity.mesh_invariance import config_dict

    d = config_dict("tms_ppgd", "float64", (1, 1))
    d["runtime"] = {k: v for k, v in d["runtime"].items() if k != "mesh"} | runtime
    with pytest.raises(ConfigError, match=rf"^{field}: the torch oracle"):
        make_backend("torch", resolve_run(parse_config(d)))
