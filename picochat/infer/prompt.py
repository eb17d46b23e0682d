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

import bisect
import itertools
import re
from dataclasses import dataclass

from picochat.errors import UserError
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer, render_for_completion
from picochat.tokenizer.chat import ConversationError, join_text_parts, normalize_messages


class ContextLengthError(UserError):
    """The newest message (with the system text) is longer than the model's context allows."""


@dataclass
class FittedPrompt:
    ids: list[int]  # prompt ids for the next assistant turn
    dropped: int  # messages left out from the front (0 when everything fits)


def fit_turns(tokenizer: Tokenizer, conversation: dict, max_prompt_tokens: int) -> FittedPrompt:
    """The prompt for the next assistant turn within `max_prompt_tokens`, dropping the fewest
    oldest user/assistant pairs that make it fit. Each message is encoded once to count its
    tokens; the bisection over how many pairs to drop adds up counts, and only the answer is
    rendered (a 1,000-message chat costs one encoding of each message, not one per try)."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ConversationError(None, "'messages' must be a non-empty list")
    system = messages[:1] if isinstance(messages[0], dict) and messages[0].get("role") == "system" else []
    turns = messages[len(system):]
    if turns and isinstance(turns[-1], dict) and turns[-1].get("role") == "assistant":
        turns = turns[:-1]  # render_for_completion would drop it too
    normalize_messages({"messages": system + turns})  # roles and content, before anything is encoded
    system_text = system[0]["content"] if system else ""
    sizes = [_rendered_size(tokenizer, m) for m in turns]
    after = [*itertools.accumulate(reversed(sizes), initial=0)][::-1]  # after[i]: tokens of turns[i:]

    def size(pairs_dropped: int) -> int:
        """len(render_for_completion(system + turns[2 * pairs_dropped:])), by counting."""
        first = 2 * pairs_dropped
        head = sizes[first]  # the system text is folded into the first user message kept
        if system_text:
            head = 2 + len(tokenizer.encode(f"{system_text}\n\n{turns[first]['content']}"))
        return 1 + head + after[first + 1] + 1  # <|bos|> ... <|assistant_start|>

    hi = (len(turns) - 1) // 2  # hi keeps only the last user turn
    if size(hi) > max_prompt_tokens:
        what = "the system text and the last message" if system_text else "the last message"
        raise ContextLengthError(f"{what}: {size(hi)} tokens, but the model's context leaves {max_prompt_tokens} "
                                 "for the prompt; shorten the message")
    # the fewest pairs to drop, by bisection: size() shrinks as more are dropped
    hi = bisect.bisect_left(range(hi), True, key=lambda pairs: size(pairs) <= max_prompt_tokens)
    return FittedPrompt(render_for_completion(tokenizer, {"messages": system + turns[2 * hi:]}), 2 * hi)


def _rendered_size(tokenizer: Tokenizer, message: dict) -> int:
    """Tokens a (validated) user or assistant message adds to a rendered conversation."""
    content = message["content"]
    if isinstance(content, str):
        return 2 + len(tokenizer.encode(content))  # <|user_start|> ... <|user_end|> (or assistant)
    return 2 + sum(len(tokenizer.encode(p["text"])) + (0 if p["type"] == "text" else 2)
                   for p in join_text_parts(content))  # adjacent text parts render as one text


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
