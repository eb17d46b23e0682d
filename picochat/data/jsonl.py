"""Reading JSON Lines files with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from picochat.errors import DataError


def iter_jsonl(path: Path, hint: str = "") -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed object) for each non-blank line; a broken line is a DataError."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno}){hint}") from e
