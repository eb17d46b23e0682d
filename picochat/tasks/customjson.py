"""Conversations from a JSONL file you write yourself, and picochat's identity conversations.

One conversation per line, either `{"messages": [...]}` or the bare list of messages,
in the one picochat chat format (see picochat.tokenizer.chat). The whole file is read and
checked when the task is built: a line that is not JSON, or a conversation that breaks a
rendering rule, raises `DataError` naming the file and the line number. Training data is held
to more than rendering needs: a conversation needs an assistant message, no assistant message
may be blank (that teaches the model to answer with nothing), and a `python_output` part must
directly follow the `python` call it answers (a tool output the model never asked for teaches
it to expect results it did not compute).

`identity()` is the built-in file `picochat/tasks/data/identity.jsonl`: hand-written
conversations in which the model says what it is (a small picochat model trained by its
user), what it can and cannot do, and how it uses its calculator tool. Mid-training and
SFT mix it in (often twice) so the model answers "who are you?" truthfully.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from picochat.data.jsonl import iter_jsonl
from picochat.errors import DataError
from picochat.tasks.base import Task
from picochat.tokenizer.chat import ConversationError, normalize_messages


def read_conversations(path: str | os.PathLike) -> list[dict]:
    """Validated conversations of a JSONL file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"conversation file {path} does not exist; pass the path of a .jsonl file")
    conversations = []
    for lineno, item in iter_jsonl(path, "; each line must hold one conversation"):
        conversation = {"messages": item} if isinstance(item, list) else item
        try:
            normalize_messages(conversation)
            _check_trainable(conversation["messages"])
        except ConversationError as e:
            raise DataError(f"{path}:{lineno}: {e}") from e
        conversations.append(conversation)
    if not conversations:
        raise DataError(f"{path} holds no conversations; write one JSON conversation per line")
    return conversations


def _check_trainable(messages: list[dict]) -> None:
    """The rules of a training conversation beyond rendering (messages already normalized-valid)."""
    if not any(m["role"] == "assistant" for m in messages):
        raise ConversationError(None, "has no assistant message; the model learns only the assistant's replies")
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        parts = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
        if not any(p["text"].strip() for p in parts if p["type"] != "python_output"):
            raise ConversationError(i, "empty assistant message (only blank text)")
        for j, part in enumerate(parts):
            if part["type"] == "python_output" and (j == 0 or parts[j - 1]["type"] != "python"):
                raise ConversationError(i, f"part {j} (python_output) must directly follow a python part: "
                                           "a tool output answers the call before it")


class CustomJSON(Task):
    """The conversations of one JSONL file, in file order (training only)."""

    def __init__(self, path: str | os.PathLike, **view: int | None):
        super().__init__(**view)
        self.path = Path(path)
        self.conversations = read_conversations(self.path)

    def num_rows(self) -> int:
        return len(self.conversations)

    def get_row(self, index: int) -> dict:
        return self.conversations[index]

    @property
    def name(self) -> str:
        return f"CustomJSON[{self.path.name}]"


def identity(**view: int | None) -> CustomJSON:
    """picochat's built-in identity conversations."""
    return CustomJSON(Path(str(resources.files("picochat.tasks") / "data" / "identity.jsonl")), **view)
