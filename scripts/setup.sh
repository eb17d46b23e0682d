#!/usr/bin/env bash
# Create .venv and install picochat into it (idempotent). Usage: bash scripts/setup.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
extras=""
if [ "${1:-}" = "--dev" ]; then extras="[dev]"; fi
# torch is pinned in pyproject.toml (2.13.0): a CPU-only machine with the local wheel gets the CPU build.
python -m pip install -q -e ".${extras}" 2>&1 | grep -v -E "^(WARNING: Location|  !!|\s*$)" || true
python -c "import picochat, torch; print(f'picochat ready: torch {torch.__version__}')"
