"""Second BPE training backend: HuggingFace `tokenizers`, exported to our tiktoken ranks.

`Tokenizer.train(..., backend="hf")` lands here. The result is the same kind of
vocabulary as the rustbpe backend (ids 0..255 = the bytes 0..255, then merges in
the order they were learned), so everything downstream is backend-agnostic.
bench/tokenizer.py compares the two; rustbpe is the default (see bpe.py).

HF's byte-level BPE works on printable stand-ins for bytes (GPT-2's byte->unicode
table, `ByteLevel.alphabet()`); we map its vocabulary back to raw bytes.
"""

from __future__ import annotations

from collections.abc import Iterable

from picochat.errors import DataError


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (used by HF ByteLevel and GPT-2's files).

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space,
    NBSP, soft hyphen) map to U+0100 onwards, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


_BYTE_OF = {ch: b for b, ch in bytes_to_unicode().items()}


def unicode_to_bytes(token: str) -> bytes:
    """Raw bytes of a GPT-2-style printable token string."""
    try:
        return bytes(_BYTE_OF[ch] for ch in token)
    except KeyError as e:
        raise DataError(f"token {token!r} has a character {e} outside the byte-level alphabet") from e


def train_ranks_hf(texts: Iterable[str], n_ranks: int, pattern: str) -> dict[bytes, int]:
    """Learn `n_ranks` byte-level BPE tokens (256 bytes + merges) with HF tokenizers' BpeTrainer."""
    # HF tokenizers loads only when a tokenizer is trained with it
    from tokenizers import Regex, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer(models.BPE(unk_token=None, byte_fallback=False, fuse_unk=False))
    # Split with our regex first (isolated pieces, like tiktoken), then map bytes to the printable alphabet.
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=n_ranks, min_frequency=0, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer=trainer)

    # Single bytes take ranks 0..255 in byte order; learned tokens keep HF's id order, which is merge order.
    ranks = {bytes([b]): b for b in range(256)}
    for token, _ in sorted(hf.get_vocab().items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            ranks.setdefault(unicode_to_bytes(token), len(ranks))
    return ranks
