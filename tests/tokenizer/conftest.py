"""Fixtures for tokenizer tests: a generated multilingual corpus and tokenizers trained on it once."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from picochat.data.shards import write_shard
from picochat.tokenizer import Tokenizer

COMMON_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will more said what time people year "
    "water river city market garden number system energy light school music story small large early later "
    "between because through without against during before after under above quickly slowly carefully"
)
WORDS = COMMON_WORDS.split()
NON_ENGLISH = [
    "Grüße aus München, die Straße ist naß und der Fluss fließt schnell.",
    "오늘 날씨가 정말 좋아서 공원에서 산책을 했어요.",
    "你好，世界！今天我们学习分词器。",
    "Ça va très bien, merci — à bientôt !",
    "Привет, как дела? Всё хорошо.",
    "Party time 🎉🎉 with family 👨‍👩‍👧 and cake 🍰.",
]
SYLLABLES = ["ka", "ri", "to", "ne", "mu", "sha", "lo", "ven", "dor", "tin", "pe", "qua", "zil", "bra", "ost", "um"]
CODE = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "if (x > 0) { y = x / 2; } else { y = -x; }\n",
]


def generated_documents(n_chars: int, seed: int = 0) -> list[str]:
    """Documents of English-like sentences with numbers, code and non-English lines, ~n_chars in all."""
    rng = random.Random(seed)
    docs: list[str] = []
    total = 0
    while total < n_chars:
        sentences = []
        for _ in range(rng.randint(3, 12)):
            words = rng.choices(WORDS, k=rng.randint(4, 14))
            # Made-up words give the trainer far more distinct pairs than the fixed word list alone.
            words += ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(rng.randint(0, 4))]
            rng.shuffle(words)
            if rng.random() < 0.3:
                words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
            sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", "!", "?"]))
        if rng.random() < 0.3:
            sentences.append(rng.choice(NON_ENGLISH))
        if rng.random() < 0.2:
            sentences.append("\n" + rng.choice(CODE))
        doc = " ".join(sentences)
        docs.append(doc)
        total += len(doc)
    return docs


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return generated_documents(300_000)


@pytest.fixture(scope="session")
def tok(corpus: list[str]) -> Tokenizer:
    """A 1,024-id tokenizer trained with the default backend on ~300 KB of generated text."""
    return Tokenizer.train(corpus, vocab_size=1024)


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small parquet shards (two train, one val) of generated documents."""
    d = tmp_path_factory.mktemp("shards")
    docs = generated_documents(120_000, seed=1)
    third = len(docs) // 3
    for i in range(3):
        write_shard(d / f"shard_{i:05d}.parquet", docs[i * third:(i + 1) * third], row_group_size=64)
    return d
