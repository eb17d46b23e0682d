"""Fixtures for training tests: a tiny corpus in shards and a tiny tokenizer under a temp $PICOCHAT_HOME."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from picochat.data.shards import write_shard
from picochat.tokenizer import Tokenizer

WORDS = ["the", "cat", "dog", "sat", "on", "a", "mat", "and", "ran", "to", "house", "tree", "big", "small", "red", "blue", "green", "happy", "sad", "quick", "slow", "jumped", "over", "under", "river", "mountain", "city", "people", "said", "that", "this", "was", "good", "bad", "day", "night", "sun", "moon", "star", "water", "fire", "earth", "wind", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def make_documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        sentences = []
        for _ in range(rng.randint(2, 6)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
            sentences.append(" ".join(words).capitalize() + ".")
        docs.append(f"Document {i}. " + " ".join(sentences))
    return docs


def build_corpus(root: Path, n_docs: int = 600, shards: int = 3, row_group_size: int = 50) -> Path:
    docs = make_documents(n_docs)
    per = len(docs) // shards
    data_dir = root / "data" / "builtin"
    for s in range(shards):
        chunk = docs[s * per : (s + 1) * per] if s < shards - 1 else docs[s * per :]
        write_shard(data_dir / f"shard_{s:05d}.parquet", chunk, row_group_size=row_group_size)
    return data_dir


@pytest.fixture
def tiny_home(tmp_path, monkeypatch) -> Path:
    """$PICOCHAT_HOME with shards in data/builtin and a tokenizer in tokenizer/."""
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    build_corpus(tmp_path)
    tok = Tokenizer.train(make_documents(300, seed=1), vocab_size=320)
    tok.save(tmp_path / "tokenizer")
    return tmp_path
