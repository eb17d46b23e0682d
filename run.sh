#!/usr/bin/env bash
# The main job: set up, then run the whole pipeline on the CPU preset with the built-in offline corpus.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
. .venv/bin/activate
PRESET=${PRESET:-cpu}
picochat data prepare
picochat tok-train --preset "$PRESET"
picochat tok-eval
picochat base-train --preset "$PRESET" --resume
picochat base-loss
