#!/usr/bin/env bash
# Set up the environment, lint and type-check the tree, and run the whole test suite (unit
# tests + the parity gate). This is the README's test command and what CI (.ci/run) calls.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/lint.sh
export WANDB_MODE=disabled
set +e
.venv/bin/python -m pytest -n 2 --dist loadgroup --durations=25 "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then
  echo "test.sh: pytest collected no tests — that is a failure here, not a pass" >&2
  exit 1
fi
exit $rc
