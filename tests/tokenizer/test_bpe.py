"""The BPE tokenizer: special tokens, round trips, batch encoding, persistence and training backends."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest

from picochat.errors import DataError, UserError
from picochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer
from picochat.tokenizer.bpe import THREADED_MIN_CHARS, TOKEN_BYTES_FILE, TOKENIZER_FILE

from .conftest import generated_documents


def random_unicode(rng: random.Random, n: int) -> str:
    """Random text mixing ASCII, Latin-1, CJK, Hangul, emoji (with ZWJ/skin tones), combining marks and controls."""
    pools = [
        (0x20, 0x7E), (0x09, 0x0D), (0xA0, 0xFF), (0x300, 0x36F), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3),
        (0x1F300, 0x1F64F), (0x1F3FB, 0x1F3FF), (0x200D, 0x200D), (0xFE0F, 0xFE0F), (0x10000, 0x10FFFF),
    ]
    chars = []
    for _ in range(n):
        lo, hi = rng.choice(pools)
        chars.append(chr(rng.randint(lo, hi)))
    return "".join(chars)


def test_vocabulary_layout(tok: Tokenizer) -> None:
    assert tok.vocab_size == 1024
    assert all(tok.mergeable_ranks[bytes([b])] == b for b in range(256))
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(1024 - 9, 1024))
    assert tok.bos_id == tok.encode_special("bos") == tok.encode_special("<|bos|>")


def test_split_pattern_groups_digits_in_pairs(tok: Tokenizer) -> None:
    assert r"\p{N}{1,2}" in SPLIT_PATTERN
    pieces = [tok.id_to_text(i) for i in tok.encode("1234567")]
    assert "".join(pieces) == "1234567"
    assert max(len(p) for p in pieces) <= 2


@pytest.mark.parametrize("special", SPECIAL_TOKENS)
def test_special_tokens_are_one_id_and_never_come_from_text(tok: Tokenizer, special: str) -> None:
    sid = tok.encode_special(special)
    assert tok.decode([sid]) == special
    from_text = tok.encode(special)
    assert len(from_text) > 1
    assert all(not tok.is_special(i) for i in from_text)
    assert tok.decode(from_text) == special


def test_unknown_special_token_is_a_user_error(tok: Tokenizer) -> None:
    with pytest.raises(UserError, match="unknown special token 'eos'"):
        tok.encode_special("eos")


def test_round_trip_random_unicode(tok: Tokenizer) -> None:
    rng = random.Random(0)
    for _ in range(300):
        text = random_unicode(rng, rng.randint(0, 60))
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode_bytes(ids) == text.encode("utf-8")


def test_lone_surrogates_become_replacement_characters(tok: Tokenizer) -> None:
    # A lone surrogate is not valid Unicode and has no UTF-8 form: it is encoded as U+FFFD.
    assert tok.encode("a\ud800b") == tok.encode("a\ufffdb")
    assert tok.decode(tok.encode("x\udfff")) == "x\ufffd"
    assert tok.encode(["a\ud800b"]) == [tok.encode("a\ufffdb")]


def test_decode_of_a_partial_character_uses_replacement(tok: Tokenizer) -> None:
    ids = tok.encode("界")  # three bytes, never merged in training: three ids
    assert tok.decode_bytes(ids[:1]) == "界".encode()[:1]
    assert tok.decode(ids[:1]) == "\ufffd"


def test_token_bytes_sum_to_utf8_length(tok: Tokenizer, corpus: list[str]) -> None:
    token_bytes = tok.token_bytes()
    assert token_bytes.dtype == np.int32 and token_bytes.shape == (tok.vocab_size,)
    assert (token_bytes[-9:] == 0).all() and (token_bytes[:-9] > 0).all()
    for text in corpus[:20] + ["héllo wörld 你好 🎉"]:
        ids = tok.encode(text, prepend="<|bos|>")
        assert int(token_bytes[ids].sum()) == len(text.encode("utf-8"))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_batch_encode_equals_single_encode(tok: Tokenizer, threads: int) -> None:
    small = ["hello world", "", "你好", "a b c"]
    big = generated_documents(2 * THREADED_MIN_CHARS, seed=5)  # large enough for the threaded path
    for batch in (small, big, tuple(big[:7])):
        assert tok.encode(batch, num_threads=threads) == [tok.encode(t) for t in batch]
    assert tok.encode(iter(small), num_threads=threads) == [tok.encode(t) for t in small]
    assert list(tok.iter_encode(big, batch_size=10)) == [tok.encode(t) for t in big]


def test_prepend_and_append(tok: Tokenizer) -> None:
    bos, end = tok.bos_id, tok.encode_special("assistant_end")
    plain = tok.encode("hi there")
    assert tok.encode("hi there", prepend="<|bos|>") == [bos, *plain]
    assert tok.encode("hi there", prepend=bos, append="assistant_end") == [bos, *plain, end]
    assert tok.encode(["hi there", ""], prepend="bos", append=end) == [[bos, *plain, end], [bos, end]]
    big = generated_documents(2 * THREADED_MIN_CHARS, seed=6)
    assert tok.encode(big, prepend=bos) == [[bos, *tok.encode(t)] for t in big]


def test_pickles_after_threaded_encode(tok: Tokenizer) -> None:
    big = generated_documents(2 * THREADED_MIN_CHARS, seed=7)
    expected = tok.encode(big, num_threads=2)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(big, num_threads=2) == expected


def test_save_load_identical(tok: Tokenizer, tmp_path, corpus: list[str]) -> None:
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.hash == tok.hash
    assert again.vocab_size == tok.vocab_size
    assert again.special_tokens == tok.special_tokens
    assert again.encode(corpus[:50]) == tok.encode(corpus[:50])
    assert np.array_equal(np.load(tmp_path / TOKEN_BYTES_FILE), tok.token_bytes())
    assert json.loads((tmp_path / TOKENIZER_FILE).read_text())["hash"] == tok.hash
    assert Tokenizer.load(tmp_path / TOKENIZER_FILE).hash == tok.hash


def _rewrite(path, change) -> None:
    payload = json.loads(path.read_text())
    change(payload)
    path.write_text(json.dumps(payload))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda p: p.write_text(p.read_text()[:1000]), "not valid JSON"),
        (lambda p: p.write_bytes(b"\xff\xfe garbage"), "not valid JSON"),
        (lambda p: _rewrite(p, lambda d: d.update(format="other/9")), "format 'other/9'"),
        (lambda p: _rewrite(p, lambda d: d["tokens_base64"].__setitem__(300, "QUJD")), "hash mismatch"),
        (lambda p: _rewrite(p, lambda d: d["tokens_base64"].__setitem__(300, "%%%")), "corrupt tokenizer file"),
        (lambda p: _rewrite(p, lambda d: d["tokens_base64"].__setitem__(300, d["tokens_base64"][5])), "corrupt"),
        (lambda p: _rewrite(p, lambda d: d.pop("pattern")), "corrupt tokenizer file"),
        (lambda p: _rewrite(p, lambda d: d.update(tokens_base64=7)), "corrupt tokenizer file"),
        (lambda p: p.write_text("[1, 2]"), "format 'list'"),
    ],
)
def test_corrupt_file_is_a_clear_data_error(tok: Tokenizer, tmp_path, corrupt, message: str) -> None:
    tok.save(tmp_path)
    path = tmp_path / TOKENIZER_FILE
    corrupt(path)
    with pytest.raises(DataError, match=message) as info:
        Tokenizer.load(tmp_path)
    assert str(path) in str(info.value)


def test_missing_tokenizer_names_the_command(tmp_path) -> None:
    with pytest.raises(DataError, match="picochat tok-train"):
        Tokenizer.load(tmp_path / "nowhere")


def test_vocab_too_small_and_unknown_backend(corpus: list[str]) -> None:
    with pytest.raises(UserError, match="--vocab-size 100 is too small"):
        Tokenizer.train(corpus[:10], vocab_size=100)
    with pytest.raises(UserError, match="--backend 'sentencepiece'"):
        Tokenizer.train(corpus[:10], vocab_size=400, backend="sentencepiece")


def test_hf_backend_matches_rustbpe(corpus: list[str], tok: Tokenizer) -> None:
    hf = Tokenizer.train(corpus, vocab_size=1024, backend="hf")
    assert hf.vocab_size == 1024
    assert all(hf.mergeable_ranks[bytes([b])] == b for b in range(256))
    sample = corpus[-200:]
    n_bytes = sum(len(t.encode()) for t in sample)
    ratio_hf = n_bytes / sum(map(len, hf.encode(sample)))
    ratio_rust = n_bytes / sum(map(len, tok.encode(sample)))
    # Same algorithm, same pre-split: the two learn (nearly) the same merges.
    assert ratio_hf == pytest.approx(ratio_rust, rel=0.02)
    for text in sample[:20]:
        assert hf.decode(hf.encode(text)) == text


def test_a_failed_save_leaves_the_previous_files_and_no_temporaries(tok: Tokenizer, tmp_path, corpus, monkeypatch) -> None:
    """tokenizer.json and token_bytes.npy are replaced together or not at all (a full disk mid-save)."""
    old = Tokenizer.train(corpus[:50], vocab_size=300)
    old.save(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        tok.save(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert Tokenizer.load(tmp_path).hash == old.hash
