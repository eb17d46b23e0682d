"""CustomJSON files (clear errors with line numbers) and the built-in identity conversations."""

from __future__ import annotations

import json
import re

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


USER = {"role": "user", "content": "What is 12*7?"}


@pytest.mark.parametrize(
    "messages, rule",
    [
        # a blank reply trains the model to answer with nothing
        ([USER, {"role": "assistant", "content": "   "}], r"message 1: empty assistant message"),
        ([USER, {"role": "assistant", "content": [{"type": "text", "text": ""}]}], r"message 1: empty assistant message"),
        ([{"role": "system", "content": "Be brief."}, USER, {"role": "assistant", "content": "\n"}],
         r"message 2: empty assistant message"),
        # a tool output where the assistant's text is expected: the model never asked for it
        ([USER, {"role": "assistant", "content": [{"type": "python_output", "text": "84"}, {"type": "text", "text": "84"}]}],
         r"message 1: part 0 \(python_output\) must directly follow a python part"),
        ([USER, {"role": "assistant", "content": [{"type": "text", "text": "It is"}, {"type": "python_output", "text": "84"}]}],
         r"message 1: part 1 \(python_output\) must directly follow a python part"),
        # nothing for the model to learn
        ([USER], r"conversation: has no assistant message"),
    ],
)
def test_untrainable_conversations_are_refused_with_file_and_line(tmp_path, messages, rule):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD), json.dumps({"messages": messages})])
    with pytest.raises(DataError, match="^" + re.escape(f"{tmp_path / 'bad.jsonl'}:2: ") + rule) as info:
        CustomJSON(path)
    assert "\n" not in str(info.value)


def test_a_calculator_call_with_its_output_is_accepted(tmp_path):
    parts = [{"type": "text", "text": "Let me compute."}, {"type": "python", "text": "12*7"},
             {"type": "python_output", "text": "84"}, {"type": "text", "text": "It is 84."}]
    path = write_lines(tmp_path / "ok.jsonl", [json.dumps({"messages": [USER, {"role": "assistant", "content": parts}]})])
    assert len(CustomJSON(path)) == 1
