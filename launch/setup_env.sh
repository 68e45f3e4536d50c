#!/usr/bin/env bash
# Create (or reuse) the local virtual environment .venv with everything the toolkit and its tests need.
# CPU machines get torch==2.13.0 (a local CPU wheel here); a machine that already has torch keeps it.
# Usage: bash launch/setup_env.sh        (then: . .venv/bin/activate)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.toolkit-installed"
want="$(cat requirements.txt setup.py | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if ! python -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==$TORCH_VERSION"
  pip install --quiet "torch==$TORCH_VERSION"
fi
echo "[setup] installing the toolkit and its dependencies"
pip install --quiet -r requirements.txt
pip install --quiet --no-deps -e .
echo "$want" > "$stamp"
echo "[setup] ready: . $VENV/bin/activate"
