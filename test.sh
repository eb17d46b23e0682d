#!/usr/bin/env bash
# Set up (with test dependencies), run the whole pipeline once on the cpu-tiny preset as an
# end-to-end smoke test (fresh temporary $PICOCHAT_HOME; registry downloads are cached per machine),
# then run the whole test suite, slow tests included, in the dtype `auto` picks on this machine,
# and then the dtype-sensitive tests (engine, decode, batching, server, training step and resume)
# a second time with the other compute dtype forced through $PICOCHAT_DTYPE (fp32 <-> bf16).
# Arguments go to the first pytest run; with arguments the second pass is skipped.
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
if [ "$rc" -ne 0 ] || [ "$#" -gt 0 ]; then
  exit "$rc"
fi
other=$(python -c "import torch; from picochat.runtime import pick_dtype; \
print('fp32' if pick_dtype(torch.device('cpu')) == torch.bfloat16 else 'bf16')")
echo "== dtype-sensitive tests again with PICOCHAT_DTYPE=$other"
PICOCHAT_DTYPE=$other python -m pytest -q -p no:cacheprovider \
  tests/infer tests/serve/test_api.py tests/serve/test_openai_api.py tests/serve/test_completions.py \
  tests/serve/test_dtypes.py tests/train/test_base_train.py tests/train/test_chat_stages.py tests/train/test_rl.py
