"""Conversation -> prompt ids that fit the model's context, dropping the oldest turns first.

A chat can outgrow the context (the reference crashes there). We keep the system text and the
newest turns: whole user/assistant pairs are dropped from the front until the prompt fits, and
the caller is told how many messages went (`FittedPrompt.dropped`), so the server and the
terminal chat can say so. If the system text and the last user message alone do not fit,
nothing sensible can be dropped: `ContextLengthError` (the server answers 400
`context_length_exceeded`).

`encode_raw_prompt` is the other way in: text that may name special tokens (`<|bos|>`), as a
raw-completion client writes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from picochat.errors import UserError
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer, render_for_completion
from picochat.tokenizer.chat import ConversationError


class ContextLengthError(UserError):
    """The newest message (with the system text) is longer than the model's context allows."""


@dataclass
class FittedPrompt:
    ids: list[int]  # prompt ids for the next assistant turn
    dropped: int  # messages left out from the front (0 when everything fits)


def fit_turns(tokenizer: Tokenizer, conversation: dict, max_prompt_tokens: int) -> FittedPrompt:
    """The prompt for the next assistant turn within `max_prompt_tokens`, dropping the fewest
    oldest user/assistant pairs that make it fit (found by bisection: one render per halving)."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ConversationError(None, "'messages' must be a non-empty list")
    has_system = isinstance(messages[0], dict) and messages[0].get("role") == "system"
    system = messages[:1] if has_system else []
    turns = list(messages[1:] if has_system else messages)
    if turns and isinstance(turns[-1], dict) and turns[-1].get("role") == "assistant":
        turns = turns[:-1]  # render_for_completion would drop it too

    def render(pairs_dropped: int) -> list[int]:
        return render_for_completion(tokenizer, {"messages": system + turns[2 * pairs_dropped:]})

    ids = render(0)  # validates roles and content
    if len(ids) <= max_prompt_tokens:
        return FittedPrompt(ids, 0)
    lo, hi = 1, (len(turns) - 1) // 2  # the answer is in [lo, hi]; hi keeps only the last user turn
    last = render(hi)
    if len(last) > max_prompt_tokens:
        what = "the system text and the last message" if system else "the last message"
        raise ContextLengthError(f"{what}: {len(last)} tokens, but the model's context leaves {max_prompt_tokens} "
                                 "for the prompt; shorten the message")
    best = last
    while lo < hi:
        mid = (lo + hi) // 2
        candidate = render(mid)
        if len(candidate) <= max_prompt_tokens:
            hi, best = mid, candidate
        else:
            lo = mid + 1
    return FittedPrompt(best, 2 * hi)  # best is render(hi) throughout


def fit_conversation(tokenizer: Tokenizer, conversation: dict, max_prompt_tokens: int) -> list[int]:
    """Prompt ids for the next assistant turn, at most `max_prompt_tokens` long (see fit_turns)."""
    return fit_turns(tokenizer, conversation, max_prompt_tokens).ids


_SPECIAL = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")


def encode_raw_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """Ids of raw text in which special-token names (`<|bos|>`, `<|user_start|>`, ...) are the
    special tokens themselves and everything else is ordinary text."""
    ids: list[int] = []
    for i, piece in enumerate(_SPECIAL.split(text)):
        if i % 2:
            ids.append(tokenizer.encode_special(piece))
        elif piece:
            ids += tokenizer.encode(piece)
    return ids
