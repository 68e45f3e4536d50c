#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the whole suite on CPU (about 10-15 minutes on 2 cores).
# Usage: bash tests/run.sh [pytest args, e.g. tests/unit -k loader]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 WANDB_MODE=offline
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
export COSMOS_TOOLKIT_CACHE="${COSMOS_TOOLKIT_CACHE:-$PWD/.cache/toolkit}"
exec python -m pytest -q -rs "${@:-tests}"
