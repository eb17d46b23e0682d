"""Reading JSON Lines files with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from picochat.errors import DataError


def iter_jsonl(path: Path, hint: str = "") -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed object) for each non-blank line; a broken line is a DataError.

    The file is UTF-8, with or without a byte order mark (as some Windows editors write)."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{line_no}: not UTF-8 text ({e.reason} at byte {e.start + 1}); "
                                f"save the file as UTF-8{hint}") from e
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno}){hint}") from e
