"""JSON Lines reading: every way a hand-written file can go wrong is an error naming the file and line."""

from __future__ import annotations

import pytest

from picochat.data.jsonl import iter_jsonl
from picochat.errors import DataError


def test_lines_are_parsed_with_their_numbers_and_blank_lines_skipped(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n\n[2]\r\n')
    assert list(iter_jsonl(path)) == [(1, {"a": 1}), (3, [2])]


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes('{"text": "café"}\n{"text": "two"}\n'.encode("utf-8-sig"))
    assert list(iter_jsonl(path)) == [(1, {"text": "café"}), (2, {"text": "two"})]


def test_text_that_is_not_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"text": "one"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not UTF-8 text .*save the file as UTF-8; hint"):
        list(iter_jsonl(path, "; hint"))
