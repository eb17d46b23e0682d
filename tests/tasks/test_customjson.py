"""CustomJSON files (clear errors with line numbers) and the built-in identity conversations."""

from __future__ import annotations

import json

import pytest

from picochat.errors import DataError
from picochat.tasks import load_task
from picochat.tasks.customjson import CustomJSON, identity
from picochat.tokenizer.chat import normalize_messages

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reads_dicts_and_bare_message_lists(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [json.dumps(GOOD), "", json.dumps(GOOD["messages"])])
    task = load_task("customjson", "train", path=str(path))
    assert len(task) == 2 and task[0] == GOOD and task[1] == GOOD


def test_broken_json_line_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "broken.jsonl", [json.dumps(GOOD), json.dumps(GOOD), '{"messages": [oops'])
    with pytest.raises(DataError, match=r"broken\.jsonl:3: not valid JSON"):
        CustomJSON(path)


def test_bad_conversation_names_line_and_rule(tmp_path):
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD), json.dumps(bad)])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: message 1: role 'user' after 'user'"):
        CustomJSON(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        CustomJSON(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no conversations"):
        CustomJSON(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="needs path="):
        load_task("customjson", "train")


def test_identity_conversations_are_many_valid_and_varied():
    task = identity()
    assert len(task) >= 100
    firsts = [conv["messages"][0]["content"] for conv in task]
    assert len(set(firsts)) >= 95  # hand-written, not templated copies
    text = json.dumps([conv["messages"] for conv in task])
    for must in ("picochat", "trained by my user with the picochat pipeline", "internet", "calculator"):
        assert must in text
    assert any(len(conv["messages"]) > 2 for conv in task)  # some multi-turn
    assert any(isinstance(m["content"], list) for conv in task for m in conv["messages"])  # tool use
    for conv in task:
        normalize_messages(conv)
    assert len(load_task("identity", "train")) == len(task)
