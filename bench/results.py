"""Where a benchmark's results go: one JSON file per run, written whole or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

from picochat.runtime import home


def default_out(script: str) -> Path:
    """$PICOCHAT_HOME/bench/<script>-<local time>.json"""
    return home() / "bench" / f"{script}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def write_results(path: Path, results: dict, announce: bool = True) -> bool:
    """Write `results` as JSON to `path` (through a temporary file, so no half-written file is left);
    on failure say why on stderr and return False (the results were printed already). A script that
    may be stopped by a time limit writes its rows so far (`"partial": true`, announce=False) as
    they come, and the whole at the end."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        print(f"error: --out {path}: cannot write it ({e.strerror}); choose a writable path", file=sys.stderr)
        return False
    if announce:
        print(f"results written to {path}")
    return True
