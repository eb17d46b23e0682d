"""Conversation -> prompt ids that fit the model's context, dropping the oldest turns first.

A chat can outgrow the context (the reference crashes there). We keep the system text and the
newest turns: whole user/assistant pairs are dropped from the front until the prompt fits; if the
last user message alone is still too long, its oldest tokens go (and, as the very last resort,
the system text is cut to half the room).
"""

from __future__ import annotations

from picochat.tokenizer import Tokenizer, render_for_completion
from picochat.tokenizer.chat import ConversationError


def fit_conversation(tokenizer: Tokenizer, conversation: dict, max_prompt_tokens: int) -> list[int]:
    """Prompt ids for the next assistant turn, at most `max_prompt_tokens` long."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ConversationError(None, "'messages' must be a non-empty list")
    has_system = isinstance(messages[0], dict) and messages[0].get("role") == "system"
    system = messages[:1] if has_system else []
    turns = list(messages[1:] if has_system else messages)
    if turns and isinstance(turns[-1], dict) and turns[-1].get("role") == "assistant":
        turns = turns[:-1]  # render_for_completion would drop it too
    while True:
        ids = render_for_completion(tokenizer, {"messages": system + turns})  # validates roles and content
        if len(ids) <= max_prompt_tokens:
            return ids
        if len(turns) <= 1:
            break
        turns = turns[2:]  # drop the oldest user/assistant pair; the list still starts with a user turn
    return _cut_last_message(tokenizer, system[0]["content"] if system else "", turns[-1]["content"], max_prompt_tokens)


def _cut_last_message(tokenizer: Tokenizer, system_text: str, user_text: str, max_prompt_tokens: int) -> list[int]:
    """<|bos|><|user_start|> system head + user tail <|user_end|><|assistant_start|>, exactly in budget."""
    sp = tokenizer.encode_special
    head = [tokenizer.bos_id, sp("user_start")]
    tail = [sp("user_end"), sp("assistant_start")]
    room = max(0, max_prompt_tokens - len(head) - len(tail))
    system_ids = tokenizer.encode(system_text + "\n\n") if system_text else []
    system_ids = system_ids[: room // 2] if len(system_ids) > room // 2 else system_ids
    user_room = room - len(system_ids)
    user_ids = tokenizer.encode(user_text)
    user_ids = user_ids[len(user_ids) - user_room:] if user_room > 0 else []
    return head + system_ids + user_ids + tail
