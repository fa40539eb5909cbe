"""Import boundaries (DESIGN.md layout table): contract/ is framework-free, jax_impl/ never
imports torch, oracle_torch/ never imports jax. Each package is walked with pkgutil in a
fresh interpreter, so every module that exists is checked (new modules automatically) and
the failure names the module that first pulled a forbidden package in."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

WALK = r"""
import importlib, json, pkgutil, sys
pkg, forbidden = sys.argv[1], set(sys.argv[2].split(","))
def loaded():
    return {m.split(".")[0] for m in list(sys.modules)} & forbidden
offenders, modules = {}, []
def visit(name):
    before = loaded()
    mod = importlib.import_module(name)   # an import error fails the test (traceback on stderr)
    new = loaded() - before
    if new:
        offenders[name] = sorted(new)
    modules.append(name)
    return mod
root = visit(pkg)
for info in pkgutil.walk_packages(root.__path__, pkg + "."):
    visit(info.name)
print(json.dumps({"modules": modules, "offenders": offenders, "loaded": sorted(loaded())}))
"""

CASES = {
    # package: forbidden top-level packages
    "contract": ["torch", "jax", "jaxlib", "flax", "optax", "orbax", "transformers"],
    "jax_impl": ["torch", "transformers"],
    "oracle_torch": ["jax", "jaxlib", "flax", "optax", "orbax"],
}


@pytest.mark.parametrize("pkg", sorted(CASES))
def test_package_imports_no_forbidden_framework(pkg):
    # guards the DESIGN.md import rules; a new module of the package is covered automatically
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONDONTWRITEBYTECODE="1")
    out = subprocess.run([sys.executable, "-c", WALK, pkg, ",".join(CASES[pkg])],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"importing the modules of {pkg} failed:\n{out.stderr[-3000:]}"
    rep = json.loads(out.stdout.strip().splitlines()[-1])
    assert rep["modules"][0] == pkg
    if pkg == "contract":  # the walk really visits submodules (no vacuous pass)
        assert {"contract.config", "contract.resolve", "contract.draws", "contract.data",
                "contract.layout_diff"} <= set(rep["modules"]), rep["modules"]
    assert not rep["offenders"], f"{pkg}: these modules import forbidden packages: {rep['offenders']}"
    assert not rep["loaded"], rep

