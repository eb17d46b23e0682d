"""Parquet shards of documents (one `text` column, the FineWeb-Edu layout).

A shard directory holds `*.parquet` files; in sorted order, the last one is the
validation shard and all others are training shards (as in FineWeb-Edu
downloads, where a fixed last shard is kept for validation).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from picochat.errors import DataError
from picochat.fileio import aside
from picochat.runtime import home

PARTIAL_MARKER = ".prepare.partial"  # present while `picochat data prepare` writes a shard set


def default_data_dir(source: str = "builtin") -> Path:
    """$PICOCHAT_HOME/data/<source>: where `picochat data` writes shards."""
    return home() / "data" / source


def list_shards(directory: str | os.PathLike) -> tuple[list[Path], Path]:
    """(train shards, val shard) of a shard directory, with clear errors for unusable ones."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"shard directory {directory} does not exist; run `picochat data prepare` (offline "
                        "corpus) or `picochat data download` first, or pass --data-dir")
    if (directory / PARTIAL_MARKER).exists():
        raise DataError(f"{directory} holds an unfinished shard set (an interrupted or running "
                        "`picochat data prepare`); run `picochat data prepare` again and let it finish")
    files = sorted(p for p in directory.glob("*.parquet") if not p.name.startswith("."))
    if not files:
        raise DataError(f"{directory} holds no .parquet shards; run `picochat data prepare` or pass --data-dir")
    if len(files) == 1:
        raise DataError(f"{directory} holds one shard ({files[0].name}); need at least two: the last is kept "
                        "for validation")
    for f in (files[0], files[-1]):
        check_text_column(f)
    return files[:-1], files[-1]


def check_text_column(path: Path) -> None:
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path} is not a readable parquet file ({e}); delete it and re-download") from e
    if "text" not in schema.names:
        raise DataError(f"{path} has no 'text' column (columns: {schema.names}); shards need one document per row in 'text'")


def iter_texts(path: Path, row_group_start: int = 0) -> Iterator[tuple[int, list[str]]]:
    """Yield (row_group index, list of documents) for each row group of one shard."""
    pf = pq.ParquetFile(path)
    for rg in range(row_group_start, pf.num_row_groups):
        yield rg, pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()


def write_shard(path: Path, texts: list[str], row_group_size: int = 1024) -> None:
    """Write documents as a parquet shard atomically (temp file, then rename)."""
    with aside(path) as tmp:  # a full disk or an interrupt leaves no half-written file behind
        pq.write_table(pa.table({"text": texts}), tmp, row_group_size=row_group_size, compression="zstd")
