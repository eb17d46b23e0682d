#!/usr/bin/env bash
# Set up (with test dependencies), run the whole pipeline once on the cpu-tiny preset as an
# end-to-end smoke test (fresh temporary $PICOCHAT_HOME; registry downloads are cached per machine),
# then run the whole test suite, slow tests included.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh --dev
. .venv/bin/activate
export PICOCHAT_REGISTRY_CACHE=${PICOCHAT_REGISTRY_CACHE:-$HOME/.cache/picochat/cache/registry}
if [ "${SKIP_SPEEDRUN:-0}" != 1 ]; then
  smoke_home=$(mktemp -d)
  trap 'rm -rf "$smoke_home"' EXIT
  echo "== end-to-end: picochat speedrun --preset cpu-tiny (PICOCHAT_HOME=$smoke_home)"
  PICOCHAT_HOME="$smoke_home" picochat speedrun --preset cpu-tiny --rl
fi
echo "== tests"
set +e
python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
