#!/usr/bin/env bash
# Set up (if needed), lint, and run the whole test suite on the CPU. This is what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
echo "[test] ruff check and ruff format --check"
ruff check --quiet .
ruff format --check --quiet .
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# the slowest tests listed at the end: where the suite's time goes
python -m pytest -q --durations=15 "$@" tests
