"""`picochat tok-train`: learn the BPE vocabulary from the training shards.

Reads documents from the train shards (never the val shard) in order, each cut
to `--doc-cap` characters, until `--max-chars` characters are read; trains a
byte-level BPE of `--vocab-size` ids (9 of them special tokens); writes
`tokenizer.json`, `token_bytes.npy` and `train_report.json` to
`$PICOCHAT_HOME/tokenizer/` (or `--output-dir`). Re-running overwrites them.

    picochat tok-train --preset cpu            # 8,192 ids from up to 200M characters
    picochat tok-train --vocab-size 32768 --max-chars 2e9
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from tqdm import tqdm

from picochat.config import Options, add_preset_argument, option
from picochat.data.shards import default_data_dir, iter_texts, list_shards
from picochat.errors import ConfigError, DataError
from picochat.fileio import write_json
from picochat.runtime import home, warn
from picochat.tokenizer.bpe import BACKENDS, SPLIT_PATTERN, Tokenizer

REPORT_FILE = "train_report.json"


def parse_count(text: str) -> int:
    """A count from the command line: 200000000, 200_000_000 or 2e8."""
    try:
        value = float(text.replace("_", ""))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 2e9 or 2_000_000_000)") from e
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; give a count such as 2e9")
    if value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(value)


@dataclass
class TokTrainConfig(Options):
    """Every setting of tokenizer training; presets give vocab_size, max_chars and doc_cap."""

    vocab_size: int = option(65_536, "ids in the vocabulary, 9 special tokens included", parse=parse_count)
    max_chars: int = option(10_000_000_000, "stop reading after this many characters", parse=parse_count)
    doc_cap: int = option(10_000, "use at most this many characters of each document", parse=parse_count)
    backend: str = option("rustbpe", "BPE trainer: rustbpe (measured faster here) or hf (HuggingFace tokenizers)",
                          choices=BACKENDS)
    data_dir: str | None = option(None, "shard directory (default $PICOCHAT_HOME/data/builtin)")
    output_dir: str | None = option(None, "where to write the tokenizer (default $PICOCHAT_HOME/tokenizer)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_preset_argument(parser)
    TokTrainConfig.add_arguments(parser)


@dataclass
class ReadStats:
    """What the trainer was fed."""

    chars: int = 0
    bytes: int = 0
    docs: int = 0
    docs_capped: int = 0
    files: list[str] = field(default_factory=list)


def training_texts(train_files: list[Path], max_chars: int, doc_cap: int, stats: ReadStats) -> Iterator[str]:
    """Documents from the train shards, each capped at `doc_cap` characters, `max_chars` in all."""
    total_docs = sum(pq.ParquetFile(f).metadata.num_rows for f in train_files)
    bar = tqdm(total=total_docs, unit="doc", desc="reading", dynamic_ncols=True, mininterval=1.0)
    try:
        for path in train_files:
            stats.files.append(path.name)
            for _, docs in iter_texts(path):
                for doc in docs:
                    if not doc:
                        continue
                    stats.docs_capped += len(doc) > doc_cap
                    doc = doc[:min(doc_cap, max_chars - stats.chars)]
                    stats.chars += len(doc)
                    stats.bytes += len(doc.encode("utf-8"))
                    stats.docs += 1
                    yield doc
                    if stats.chars >= max_chars:
                        return
                bar.update(len(docs))
                bar.set_postfix_str(f"{stats.chars / 1e6:,.1f}M chars", refresh=False)
    finally:
        bar.close()
        print(f"read {stats.chars:,} characters from {stats.docs:,} documents; learning merges ...", flush=True)


def run(args: argparse.Namespace) -> int:
    cfg = TokTrainConfig.from_args(args)
    for flag, value in (("--max-chars", cfg.max_chars), ("--doc-cap", cfg.doc_cap)):
        if value <= 0:
            raise ConfigError(f"{flag} {value} must be positive")
    data_dir = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
    out_dir = Path(cfg.output_dir) if cfg.output_dir else home() / "tokenizer"
    train_files, val_file = list_shards(data_dir)
    try:  # before training, so that a bad --output-dir does not throw the run away at the end
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--output-dir {out_dir}: cannot create the directory ({e}); pass another --output-dir") from e
    print(f"training a {cfg.vocab_size:,}-id BPE tokenizer ({cfg.backend}) on {len(train_files)} train shard(s) "
          f"in {data_dir}: up to {cfg.max_chars:,} characters, {cfg.doc_cap:,} per document", flush=True)

    stats = ReadStats()
    t0 = time.perf_counter()
    tok = Tokenizer.train(training_texts(train_files, cfg.max_chars, cfg.doc_cap, stats), cfg.vocab_size,
                          backend=cfg.backend)
    seconds = time.perf_counter() - t0
    if stats.chars == 0:
        raise DataError(f"the train shards in {data_dir} hold no text; rebuild them with `picochat data prepare`")
    if tok.vocab_size < cfg.vocab_size:
        warn(f"the text ran out of pairs to merge: the vocabulary has {tok.vocab_size:,} ids, "
             f"not {cfg.vocab_size:,}; give it more text (--max-chars) or ask for fewer ids")

    # Round trip one held-out document: tiktoken must reproduce the text exactly.
    _, sample = next(iter_texts(val_file))
    sample_text = next((d for d in sample if d), "hello world")  # null rows are skipped, as in training
    if tok.decode(tok.encode(sample_text)) != sample_text:
        raise DataError(f"the trained tokenizer does not round-trip the first non-empty document of {val_file}; "
                        "please report this with the shard")

    tok.save(out_dir)
    report = {"vocab_size": tok.vocab_size, "requested_vocab_size": cfg.vocab_size, "hash": tok.hash,
              "backend": cfg.backend, "pattern": SPLIT_PATTERN, "max_chars": cfg.max_chars,
              "doc_cap": cfg.doc_cap, "data_dir": str(data_dir), "seconds": round(seconds, 3),
              "chars_per_second": round(stats.chars / max(seconds, 1e-9)), **asdict(stats)}
    write_json(out_dir / REPORT_FILE, report, indent=2)

    print(f"\nvocab size    {tok.vocab_size:,} ({len(tok.mergeable_ranks) - 256:,} merges + 256 bytes + 9 special)")
    print(f"text read     {stats.chars:,} characters ({stats.bytes / 1e6:,.1f} MB) from {stats.docs:,} documents "
          f"({stats.docs_capped:,} cut at {cfg.doc_cap:,} characters)")
    print(f"time          {seconds:.1f} s ({stats.bytes / 1e6 / max(seconds, 1e-9):.2f} MB/s)")
    print(f"hash          {tok.hash}")
    print(f"written       {out_dir}/{{tokenizer.json, token_bytes.npy, {REPORT_FILE}}}")
    return 0
