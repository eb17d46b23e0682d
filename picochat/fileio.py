"""Write a file aside, then move it into place: a reader sees the old file or the new one, never half.

Each writer has its own hidden `.<name>.<pid>-<random>.tmp` beside the target (hosts sharing a disk may
share pids), renamed onto it by `os.replace`; an exception first (a full disk, Ctrl-C) deletes it instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def aside(path: str | os.PathLike) -> Iterator[Path]:
    """A temp path for a writer that takes a name (parents made); moved onto `path` unless the block raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")
    try:
        yield tmp
        # No fsync: a crash of the process loses nothing the kernel holds; fsync per file guards only power loss.
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def writing(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """`open(path, mode, **open_kwargs)` for a block that streams into it, aside; text is UTF-8 unless told."""
    default = {} if "b" in mode else {"encoding": "utf-8"}
    with aside(path) as tmp, open(tmp, mode, **(default | open_kwargs)) as f:
        yield f


def write_text(path: str | os.PathLike, text: str) -> None:
    with writing(path) as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any, **json_kwargs: Any) -> None:
    """`json.dumps(obj, **json_kwargs)` into `path`, aside (no newline added)."""
    write_text(path, json.dumps(obj, **json_kwargs))
