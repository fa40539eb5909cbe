#!/usr/bin/env bash
# Set up the environment and train the default config (TMS 5-2) with the JAX trainer.
# Extra arguments go to the trainer, e.g. `bash scripts/train.sh --steps 500`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
CONFIG=${CONFIG:-configs/tms_5-2.yaml}
OUT=${OUT:-runs/$(basename "$CONFIG" .yaml)}
exec .venv/bin/python -m jax_impl.cli train "$CONFIG" --out "$OUT" "$@"
