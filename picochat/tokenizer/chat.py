"""Conversations -> token ids and a training mask (the one chat format).

A conversation is `{"messages": [{"role": ..., "content": ...}, ...]}`.
Roles: an optional leading "system" (folded into the first user message as
`system + "\\n\\n" + user`), then strictly alternating "user", "assistant", ...
User content is a string. Assistant content is a string or a list of parts
`{"type": "text" | "python" | "python_output", "text": str}`.

Rendering (mask 1 = the model is trained to predict this token):

    <|bos|>                                    0
    <|user_start|> text <|user_end|>           0
    <|assistant_start|>                        0
      text                                     1
      <|python_start|> expr <|python_end|>     1   (tool call)
      <|output_start|> result <|output_end|>   0   (tool output, forced at inference)
    <|assistant_end|>                          1

Adjacent text parts of one turn are joined and encoded as one string: encoding them one by one
could split a word that is one token of the joined text ("hel" + "lo" against "hello"), and the
exported chat template (picochat/export/hf.py) writes the turn out as one string and encodes it
once. Tool calls and tool outputs are never joined with anything: their markers separate them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from picochat.errors import UserError

if TYPE_CHECKING:
    from picochat.tokenizer.bpe import Tokenizer

PART_TYPES = ("text", "python", "python_output")


class ConversationError(UserError):
    """A conversation breaks a rendering rule; the message names the message index and the rule."""

    def __init__(self, index: int | None, rule: str):
        self.index, self.rule = index, rule
        where = "conversation" if index is None else f"message {index}"
        super().__init__(f"{where}: {rule}")


def normalize_messages(conversation: Any) -> list[dict]:
    """Validate a conversation and fold a leading system message; returns user/assistant messages."""
    if not isinstance(conversation, dict) or "messages" not in conversation:
        raise ConversationError(None, "must be a dict with a 'messages' list")
    messages = conversation["messages"]
    if not isinstance(messages, list) or not messages:
        raise ConversationError(None, "'messages' must be a non-empty list")
    out: list[dict] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ConversationError(i, "must be a dict with 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role not in ("system", "user", "assistant"):
            raise ConversationError(i, f"unknown role {role!r}; roles are system, user, assistant")
        if role == "system":
            if i != 0:
                raise ConversationError(i, "a system message is only allowed first")
            if not isinstance(content, str):
                raise ConversationError(i, "system content must be a string")
            continue
        if role != ("user" if len(out) % 2 == 0 else "assistant"):
            prev = out[-1]["role"] if out else "the start"
            raise ConversationError(i, f"role {role!r} after {prev!r}; roles must alternate user, assistant, user, ...")
        if role == "user":
            if not isinstance(content, str):
                raise ConversationError(i, f"user content must be a string, got {type(content).__name__}")
            if not content.strip():
                raise ConversationError(i, "empty user message")
        else:
            _check_assistant_content(i, content)
        out.append({"role": role, "content": content})
    if not out:
        raise ConversationError(None, "has no user message")
    if messages[0]["role"] == "system" and messages[0]["content"]:
        out[0] = {"role": "user", "content": f"{messages[0]['content']}\n\n{out[0]['content']}"}
    return out


def _check_assistant_content(i: int, content: Any) -> None:
    if isinstance(content, str):
        if not content:
            raise ConversationError(i, "empty assistant message")
        return
    if not isinstance(content, list):
        raise ConversationError(i, f"assistant content must be a string or a list of parts, got {type(content).__name__}")
    if not content:
        raise ConversationError(i, "empty assistant message (no parts)")
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in PART_TYPES:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ConversationError(i, f"part {j} has unknown type {kind!r}; part types are {', '.join(PART_TYPES)}")
        if not isinstance(part.get("text"), str):
            raise ConversationError(i, f"part {j} ({part['type']}) needs a string 'text'")


def join_text_parts(parts: list[dict]) -> list[dict]:
    """The parts of an assistant turn with each run of adjacent text parts joined into one text part
    (the renderer encodes text once per run; see the module docstring). Other parts are kept as they are."""
    out: list[dict] = []
    for part in parts:
        if part["type"] == "text" and out and out[-1]["type"] == "text":
            out[-1] = {"type": "text", "text": out[-1]["text"] + part["text"]}
        else:
            out.append(part)
    return out


def render_conversation(tok: Tokenizer, conversation: dict, max_tokens: int | None = 2048) -> tuple[list[int], list[int]]:
    """Token ids and mask for a whole conversation, truncated to `max_tokens` (None: no limit)."""
    messages = normalize_messages(conversation)
    sp = tok.encode_special
    ids: list[int] = []
    mask: list[int] = []

    def add(tokens: list[int] | int, m: int) -> None:
        tokens = [tokens] if isinstance(tokens, int) else tokens
        ids.extend(tokens)
        mask.extend([m] * len(tokens))

    add(tok.bos_id, 0)
    for message in messages:
        if message["role"] == "user":
            add([sp("user_start"), *tok.encode(message["content"]), sp("user_end")], 0)
            continue
        add(sp("assistant_start"), 0)
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else join_text_parts(content)
        for part in parts:
            text = tok.encode(part["text"])
            if part["type"] == "text":
                add(text, 1)
            elif part["type"] == "python":
                add([sp("python_start"), *text, sp("python_end")], 1)
            else:  # python_output: produced by the tool, not by the model
                add([sp("output_start"), *text, sp("output_end")], 0)
        add(sp("assistant_end"), 1)
    if max_tokens is not None:
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    return ids, mask


def render_for_completion(tok: Tokenizer, conversation: dict) -> list[int]:
    """Prompt ids for the model to write the next assistant turn.

    A trailing assistant message (e.g. an eval item's reference answer) is dropped;
    the prompt ends with `<|assistant_start|>`.
    """
    messages = normalize_messages(conversation)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages:
        raise ConversationError(None, "nothing to complete: no user message before the assistant turn")
    ids, _ = render_conversation(tok, {"messages": messages}, max_tokens=None)
    ids.append(tok.encode_special("assistant_start"))
    return ids
