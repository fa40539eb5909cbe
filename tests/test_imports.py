"""Import boundaries (SPEC S92): contract/ is framework-free, jax_impl/ never
imports torch, oracle_torch/ never imports jax. Each package is walked with pkgutil in a
fresh interpreter, so every module that exists is checked (new modules automatically) and
the failure names the module that first pulled a forbidden package in.

And the repository's own boundary (SPEC S95): no file cites a document a clone lacks."""
from __future__ import annotations

import json
import os
import re
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
    # guards S92; a new module of the package is covered automatically
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



# Documents that are not in the repository. The names are assembled here, so that this file
# does not cite them itself.
FOREIGN = re.compile("|".join([re.escape(".." + "/shared"), r"\b" + "ALGO" + r"RITHM\b", r"\b" + "DES" + r"IGN\b"]))


def _repo_files() -> list[str]:
    """Every tracked file, and every untracked one git does not ignore (new files count too)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"not a git checkout ({e})")
    return [f for f in out.stdout.splitlines() if (REPO / f).is_file()]


def test_repository_cites_only_itself():
    # guards S95: a clone holds no document beside the repository, so nothing may cite one;
    # SPEC.md is the normative text and code, tests and docs cite its invariant IDs
    files = _repo_files()
    assert "SPEC.md" in files and "tests/test_imports.py" in files  # the walk is not vacuous
    bad = []
    for f in files:
        data = (REPO / f).read_bytes()
        if b"\0" in data:
            continue  # binary (weights, goldens)
        for i, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if FOREIGN.search(line):
                bad.append(f"{f}:{i}: {line.strip()[:120]}")
    assert not bad, "these lines cite documents outside the repository (cite SPEC.md IDs instead):\n" + "\n".join(bad)
