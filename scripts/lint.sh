#!/usr/bin/env bash
# Lint and type-check the tree with the venv's pinned tools (configured in pyproject.toml):
#   ruff check .   pyflakes, bugbear, isort-style imports, pyupgrade, unparsable files, overlong lines
#   basedpyright   type check ("basic") and import cycles (reportImportCycles), offline
# Both always run; exits non-zero if either reports anything (warnings included) or cannot
# run, and ends with a one-line summary. Needs .venv (bash scripts/setup.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
for tool in ruff basedpyright; do
  if [ ! -x ".venv/bin/$tool" ]; then
    echo "lint.sh: .venv/bin/$tool is missing; run: bash scripts/setup.sh" >&2
    exit 2
  fi
done
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "== ruff check ."
.venv/bin/ruff check --output-format concise . 2>&1 | tee "$out/ruff"
ruff_rc=${PIPESTATUS[0]}

echo "== basedpyright"
.venv/bin/basedpyright --warnings 2>&1 | tee "$out/pyright"
pyright_rc=${PIPESTATUS[0]}

# ruff: exit 0 clean, 1 findings, 2 could not run. basedpyright: 0 clean, 1 findings, 2/3 could not run.
if [ "$ruff_rc" -le 1 ]; then
  ruff_n=$(grep -oE '^Found [0-9]+ error' "$out/ruff" | grep -oE '[0-9]+' || true)
  ruff_msg="ruff ${ruff_n:-0} finding(s)"
  [ "$ruff_rc" -eq 1 ] && [ -z "$ruff_n" ] && ruff_msg="ruff failed (exit 1, no count)"
else
  ruff_msg="ruff could not run (exit $ruff_rc)"
fi
if [ "$pyright_rc" -le 1 ]; then
  counts=$(grep -oE '^[0-9]+ errors?, [0-9]+ warnings?' "$out/pyright" | tail -1)
  pyright_msg="basedpyright ${counts:-?}"
  [ -z "$counts" ] && pyright_msg="basedpyright failed (exit $pyright_rc, no count)"
else
  pyright_msg="basedpyright could not run (exit $pyright_rc)"
fi

if [ "$ruff_rc" -eq 0 ] && [ "$pyright_rc" -eq 0 ]; then
  echo "lint.sh: OK — $ruff_msg; $pyright_msg"
  exit 0
fi
echo "lint.sh: FAILED — $ruff_msg; $pyright_msg"
exit 1
