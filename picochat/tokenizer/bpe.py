"""Byte-level BPE tokenizer: trained with rustbpe, encoded with tiktoken, saved as JSON.

Layout of the vocabulary: ids 0..255 are the 256 bytes (id = byte value), then
the learned merges in the order they were learned, then the 9 special tokens.
Plain text never produces a special id: `encode` treats "<|bos|>" in text as
ordinary characters. Text is pre-split with GPT-4's regex, except that numbers
are split into runs of 1-2 digits instead of 1-3 (see SPLIT_PATTERN).

Training backend: rustbpe by default, HF `tokenizers` on request (train_hf.py).
Both learn the same vocabulary (identical bytes/token: 4.024 at 8,192 ids and
4.645 at 32,768 on 10 MB of the built-in corpus), but rustbpe does it with
2.4-2.7x less work. bench/tokenizer.py, 2 cores shared with other jobs (load
8-11), best of 5, wall / CPU seconds:

    vocab     rustbpe        HF tokenizers
    8,192     4.2 s / 1.4 s  10.0 s / 3.3 s   (HF at 0.42x rustbpe's MB/s)
    32,768    3.8 s / 1.5 s  12.0 s / 3.9 s   (0.32x)

Three other runs put HF at 0.31-0.57x, never closer.

Encoding: tiktoken's `encode_ordinary`, run over a batch by a thread pool kept
for the tokenizer's life (see `_encode_batch` for why not `encode_ordinary_batch`).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tiktoken

from picochat.errors import DataError, UserError
from picochat.fileio import writing
from picochat.tokenizer.chat import render_conversation, render_for_completion

SPECIAL_TOKENS = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")

# GPT-4's split pattern with numbers grouped in runs of 1-2 digits instead of 1-3
# (better bpb for small vocabularies: fewer distinct number tokens to learn).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

FORMAT = "picochat-tokenizer/1"
TOKENIZER_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.npy"
MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + 1
BACKENDS = ("rustbpe", "hf")
# Below this many characters a batch is encoded on the calling thread: handing it to the pool costs more.
THREADED_MIN_CHARS = 1 << 16
SLICES_PER_THREAD = 4


class Tokenizer:
    """A BPE vocabulary plus the chat special tokens.

    >>> tok = Tokenizer.load(dir); ids = tok.encode("hello", prepend="<|bos|>")
    """

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN, name: str = "picochat"):
        n = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(n)):
            raise DataError("tokenizer ranks must be exactly 0..N-1")
        self.mergeable_ranks, self.pattern = mergeable_ranks, pattern
        self.special_tokens = {tok: n + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                      special_tokens=self.special_tokens)
        self.hash = self._content_hash()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_key = (-1, 0)  # (process id, threads) the pool was made for

    def __getstate__(self) -> dict:
        # A thread pool cannot be pickled (or survive a fork); workers build their own.
        return {**self.__dict__, "_pool": None, "_pool_key": (-1, 0)}

    # ---- training -------------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, pattern: str = SPLIT_PATTERN,
              backend: str = "rustbpe") -> Tokenizer:
        """Learn `vocab_size - 9` byte-level BPE tokens (256 bytes + merges) from `texts`.

        backend "rustbpe" (default, the faster here) or "hf" (HuggingFace tokenizers, train_hf.py).
        """
        if vocab_size < MIN_VOCAB:
            raise UserError(f"--vocab-size {vocab_size} is too small: need at least {MIN_VOCAB} (256 bytes + 9 specials + 1)")
        n_ranks = vocab_size - len(SPECIAL_TOKENS)
        if backend == "rustbpe":
            import rustbpe  # the trainers load only when a tokenizer is trained

            trainer = rustbpe.Tokenizer()
            trainer.train_from_iterator(iter(texts), n_ranks, pattern=pattern)
            ranks = {bytes(k): int(v) for k, v in trainer.get_mergeable_ranks()}
        elif backend == "hf":
            from picochat.tokenizer.train_hf import train_ranks_hf  # the trainers load only when used

            ranks = train_ranks_hf(texts, n_ranks, pattern)
        else:
            raise UserError(f"--backend {backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
        return cls(ranks, pattern)

    # ---- persistence ----------------------------------------------------------------------------
    def _content_hash(self) -> str:
        h = hashlib.sha256()
        h.update(self.pattern.encode())
        for token, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]):
            h.update(rank.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
        h.update("\x00".join(SPECIAL_TOKENS).encode())
        return h.hexdigest()[:16]

    def save(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json (+ token_bytes.npy) atomically into `directory`: both are written to
        temporary files first, so a failure leaves the previous pair and no partial file."""
        directory = Path(directory)
        ranked = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        payload = {"format": FORMAT, "hash": self.hash, "pattern": self.pattern,
                   "special_tokens": self.special_tokens, "vocab_size": self.vocab_size,
                   "tokens_base64": [base64.b64encode(tok).decode("ascii") for tok, _ in ranked]}
        path = directory / TOKENIZER_FILE
        with writing(path) as f:  # moved into place last, after token_bytes.npy
            f.write(json.dumps(payload))  # dumps: C-accelerated, unlike dump
            with writing(directory / TOKEN_BYTES_FILE, "wb") as tb:
                np.save(tb, self.token_bytes())
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        directory = Path(directory)
        path = directory / TOKENIZER_FILE if directory.is_dir() else directory
        if not path.exists():
            raise DataError(f"no tokenizer at {path}; train one with `picochat tok-train`")
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path} is not valid JSON ({e}); retrain with `picochat tok-train`") from e
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
            raise DataError(f"{path}: format {found!r} is not {FORMAT!r}; retrain the tokenizer")
        try:
            tokens = [base64.b64decode(t, validate=True) for t in payload["tokens_base64"]]
            ranks = {t: i for i, t in enumerate(tokens)}
            if len(ranks) != len(tokens):
                raise ValueError("duplicate tokens")
            tok = cls(ranks, payload["pattern"])
        except (KeyError, TypeError, ValueError, DataError) as e:
            raise DataError(f"{path}: corrupt tokenizer file ({type(e).__name__}: {e}); retrain with `picochat tok-train`") from e
        if tok.hash != payload.get("hash"):
            raise DataError(f"{path}: content hash mismatch (file {payload.get('hash')}, content {tok.hash}); the file is corrupt")
        return tok

    # ---- vocabulary -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.mergeable_ranks) + len(SPECIAL_TOKENS)

    @property
    def bos_id(self) -> int:
        return self.special_tokens["<|bos|>"]

    def encode_special(self, name: str) -> int:
        """Id of a special token, by its full text ('<|bos|>') or bare name ('bos')."""
        key = name if name.startswith("<|") else f"<|{name}|>"
        if key not in self.special_tokens:
            raise UserError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}")
        return self.special_tokens[key]

    def is_special(self, token_id: int) -> bool:
        return token_id >= len(self.mergeable_ranks)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 byte length of each id's text (int32), 0 for special tokens: the bpb denominator."""
        out = np.zeros(self.vocab_size, dtype=np.int32)
        for token, rank in self.mergeable_ranks.items():
            out[rank] = len(token)
        return out

    # ---- encode / decode ------------------------------------------------------------------------
    def _resolve(self, token: int | str | None) -> int | None:
        return token if token is None or isinstance(token, int) else self.encode_special(token)

    def encode(self, text: str | Sequence[str], prepend: int | str | None = None,
               append: int | str | None = None,
               num_threads: int | None = None) -> list[int] | list[list[int]]:
        """Encode one string (-> list of ids) or a batch of strings (-> list of lists, threaded).

        Special-token text such as "<|bos|>" is encoded as ordinary characters; special ids
        come only from `prepend`/`append` (an id or a special token's name) or `encode_special`.
        Lone surrogates (e.g. "\\ud800", not valid Unicode) are encoded as U+FFFD, like tiktoken.
        """
        pre, post = self._resolve(prepend), self._resolve(append)
        if isinstance(text, str):
            batch = [self._enc.encode_ordinary(text)]
        else:
            batch = self._encode_batch(text if isinstance(text, (list, tuple)) else list(text), num_threads)
        for ids in batch:
            if pre is not None:
                ids.insert(0, pre)
            if post is not None:
                ids.append(post)
        return batch[0] if isinstance(text, str) else batch

    def _encode_batch(self, texts: Sequence[str], num_threads: int | None) -> list[list[int]]:
        # tiktoken's encode_ordinary_batch makes a new pool per call and one future per text, so
        # threads hand the GIL back and forth per document. Instead: a pool kept for the tokenizer's
        # life and a few strided slices per thread (strides mix long and short documents; several
        # slices per thread let a thread that got more CPU take more work). Small batches stay here.
        threads = num_threads or max(1, min(8, os.cpu_count() or 1))
        encode = self._enc.encode_ordinary
        if threads == 1 or len(texts) < 2 * threads or sum(map(len, texts)) < THREADED_MIN_CHARS:
            return [encode(t) for t in texts]
        if self._pool is None or self._pool_key != (os.getpid(), threads):
            self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tokenizer")
            self._pool_key = (os.getpid(), threads)
        n_slices = min(len(texts), SLICES_PER_THREAD * threads)
        slices = [texts[i::n_slices] for i in range(n_slices)]
        out: list = [None] * len(texts)
        for i, ids in enumerate(self._pool.map(lambda part: [encode(t) for t in part], slices)):
            out[i::n_slices] = ids
        return out

    def iter_encode(self, texts: Iterable[str], batch_size: int = 128) -> Iterator[list[int]]:
        """Encode a stream of texts in threaded batches of `batch_size`, yielding one id list per text."""
        texts = iter(texts)
        while batch := list(itertools.islice(texts, batch_size)):
            yield from self.encode(batch)

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode(list(ids), errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self._enc.decode_bytes(list(ids))

    def id_to_text(self, token_id: int) -> str:
        return self._enc.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")

    # ---- chat rendering (see picochat.tokenizer.chat) -------------------------------------------
    def render_conversation(self, conversation: dict, max_tokens: int | None = 2048) -> tuple[list[int], list[int]]:
        return render_conversation(self, conversation, max_tokens=max_tokens)

    def render_for_completion(self, conversation: dict) -> list[int]:
        return render_for_completion(self, conversation)
