#!/usr/bin/env bash
# Set up (with test dependencies) and run the whole test suite, slow tests included.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh --dev
. .venv/bin/activate
set +e
python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
