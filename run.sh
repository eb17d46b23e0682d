#!/usr/bin/env bash
# The main job: set up, then run the whole pipeline (data -> tokenizer -> base -> mid -> SFT -> evals ->
# report) on the CPU preset with the built-in offline corpus. Re-running continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
. .venv/bin/activate
picochat speedrun --preset "${PRESET:-cpu}" "$@"
