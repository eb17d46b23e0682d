"""Corpus hygiene: which documents the built-in corpus leaves out, and why.

Four filters run in this order over the cleaned documents of every source, and each
dropped document is counted under the first filter that caught it:

1. boilerplate: Project Gutenberg headers and licence text (after `strip_gutenberg`, a
   document that still carries licence lines is dropped whole);
2. profanity: a document containing any word of `BLOCKED_WORDS` (whole words, case
   folded). The list is short on purpose: common English profanity and slurs, written out
   as exact forms, because prefixes catch innocent words in the older sources ("shittim"
   wood in the KJV, "niggard" in Shakespeare, "retard" as a verb in State of the Union
   addresses, "dick" in Moby-Dick). Mild or archaic words (damn, whore, bastard) stay: they are
   frequent in the Bible and Shakespeare;
3. exact duplicates: the same text up to case and whitespace;
4. near duplicates: MinHash over word 5-gram shingles (`NUM_HASHES` hashes, banded for
   candidate pairs), dropping a document whose estimated Jaccard similarity with an earlier
   kept one reaches `NEAR_DUP_JACCARD`.

Everything is deterministic: hashes are crc32/blake2b-based (never Python's salted
`hash`) and the first document in source order is the one kept.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Iterable

import numpy as np

FILTERS = ("boilerplate", "profanity", "exact_duplicate", "near_duplicate")

BLOCKED_WORDS = frozenset([
    "fuck", "fucks", "fucked", "fucker", "fuckers", "fucking", "fuckin", "motherfucker", "motherfuckers",
    "motherfucking", "shit", "shits", "shitty", "shitting", "bullshit", "shithead", "cunt", "cunts", "bitch",
    "bitches", "bitchy", "bitching", "asshole", "assholes", "cocksucker", "dickhead", "twat", "wanker",
    "slut", "sluts", "pussy", "nigger", "niggers", "nigga", "niggas", "niggaz", "faggot", "faggots", "fag",
    "fags", "kike", "kikes", "spic", "spics", "wetback", "wetbacks", "tranny", "trannies",
])

_BOILERPLATE = re.compile(
    r"project gutenberg|gutenberg-tm|gutenberg\.org|this e-?book is for the use of anyone"
    r"|end of (?:the |this )?project gutenberg|start of (?:the |this )?project gutenberg",
    re.IGNORECASE,
)
_WORD = re.compile(r"(?:[^\W_]|')+")  # letters and digits of any alphabet, and apostrophes

SHINGLE_WORDS = 5
NUM_HASHES = 64
BANDS = 16  # 16 bands of 4 rows: pairs above ~0.5 Jaccard become candidates
NEAR_DUP_JACCARD = 0.8

_rng = np.random.default_rng(20261203)
_MULT = (_rng.integers(1, 2**63, NUM_HASHES, dtype=np.uint64) * np.uint64(2) + np.uint64(1))  # odd multipliers
_XOR = _rng.integers(0, 2**63, NUM_HASHES, dtype=np.uint64)


def is_boilerplate(text: str) -> bool:
    """True when the document carries Project Gutenberg header or licence text."""
    return _BOILERPLATE.search(text) is not None


def words_of(text: str) -> list[str]:
    """Lowercase words (letters and digits of any alphabet, apostrophes) in order."""
    return _WORD.findall(text.lower())


def blocked_words(text: str) -> set[str]:
    """The words of `BLOCKED_WORDS` that occur in `text`."""
    return {w.strip("'") for w in words_of(text)} & BLOCKED_WORDS


def exact_key(text: str) -> bytes:
    """Identity of a text up to case and whitespace."""
    return hashlib.blake2b(" ".join(text.lower().split()).encode(), digest_size=16).digest()


def minhash(text: str) -> np.ndarray:
    """(NUM_HASHES,) uint64 MinHash signature of the document's word 5-gram shingles."""
    words = words_of(text)
    n = max(1, len(words) - SHINGLE_WORDS + 1)
    shingles = {zlib.crc32(" ".join(words[i:i + SHINGLE_WORDS]).encode()) for i in range(n)}
    x = np.fromiter(shingles, dtype=np.uint64, count=len(shingles))
    with np.errstate(over="ignore"):  # multiplication mod 2^64 is the point
        mixed = ((x[None, :] ^ _XOR[:, None]) * _MULT[:, None])  # (NUM_HASHES, shingles)
        mixed ^= mixed >> np.uint64(29)
    return mixed.min(axis=1)


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Share of signature positions where two MinHash signatures agree."""
    return float(np.mean(a == b))


def filter_documents(docs: Iterable[tuple[str, str]]) -> tuple[list[tuple[str, str]], dict[str, dict[str, int]]]:
    """(kept (source, text) pairs in input order, {source: {filter: documents dropped}})."""
    dropped: dict[str, dict[str, int]] = {}
    kept: list[tuple[str, str]] = []
    exact_seen: set[bytes] = set()
    signatures: list[np.ndarray] = []
    buckets: dict[tuple[int, bytes], list[int]] = {}
    rows = NUM_HASHES // BANDS
    for source, text in docs:
        counts = dropped.setdefault(source, dict.fromkeys(FILTERS, 0))
        if is_boilerplate(text):
            counts["boilerplate"] += 1
        elif blocked_words(text):
            counts["profanity"] += 1
        elif (key := exact_key(text)) in exact_seen:
            counts["exact_duplicate"] += 1
        else:
            sig = minhash(text)
            bands = [(b, sig[b * rows:(b + 1) * rows].tobytes()) for b in range(BANDS)]
            candidates = {j for band in bands for j in buckets.get(band, ())}
            if any(estimated_jaccard(sig, signatures[j]) >= NEAR_DUP_JACCARD for j in sorted(candidates)):
                counts["near_duplicate"] += 1
                continue
            exact_seen.add(key)
            for band in bands:
                buckets.setdefault(band, []).append(len(signatures))
            signatures.append(sig)
            kept.append((source, text))
    return kept, dropped


def recipe() -> dict:
    """What decides the filters' output, for the corpus manifest's recipe (a change rebuilds)."""
    return {"filters": list(FILTERS), "blocked_words": hashlib.sha1(" ".join(sorted(BLOCKED_WORDS)).encode()).hexdigest(),
            "boilerplate": _BOILERPLATE.pattern, "shingle_words": SHINGLE_WORDS, "num_hashes": NUM_HASHES,
            "bands": BANDS, "near_dup_jaccard": NEAR_DUP_JACCARD}
