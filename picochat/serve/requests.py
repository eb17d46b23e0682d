"""Validation of OpenAI-style requests (chat completions, completions), with OpenAI-style errors.

Every check names the offending field (`param`) so a client sees exactly what to fix:
    {"error": {"message": "...", "type": "invalid_request_error", "param": "messages.2.role", "code": null}}

A field picochat does not implement is refused with 400 naming it, as OpenAI refuses a field it
does not know; only `user` (an end-user id OpenAI keeps for abuse monitoring, which never changes
the output) is accepted and ignored. Fields that would change the output are accepted only at
their no-op value (`frequency_penalty: 0`, `logit_bias: {}`, `response_format: {"type": "text"}`,
`tool_choice: "none"`, ...). One field beyond OpenAI's: `repetition_penalty` (> 1 makes the last 64
generated tokens less likely; 1 is off), whose default is `picochat serve --repetition-penalty` (the
chat default, 1.2) for chat requests and off for completions.

Roles: `developer` is `system`; system messages in a row at the start are joined into the one system
text (a blank line apart). An assistant message may carry back the fields of picochat's own reply
(`picochat`, and OpenAI's `refusal`, `audio`, ... at null); its "" is the empty turn. Tool messages
follow picochat's own calculator: an assistant message may carry `tool_calls` of the function
`calculator` (arguments `{"expression": ...}`) or end in a `<<expr>>` call, and the `tool` message
after it is that call's result (rendered as `python_output`); an assistant message after a tool
message continues the same turn.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from picochat.infer.streaming import parse_display_text
from picochat.tokenizer.chat import ConversationError, normalize_messages

MAX_STOPS = 4
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1_000_000
    max_messages: int = 1_000
    max_message_chars: int = 8_000
    max_total_chars: int = 200_000
    max_tokens: int = 4_096
    max_n: int = 8
    max_top_k: int = 200
    max_prompts: int = 32  # /v1/completions: prompts in one request


@dataclass(frozen=True)
class Defaults:
    temperature: float = 0.8
    top_k: int = 50
    max_tokens: int = 512
    repetition_penalty: float | None = None  # None: off


@dataclass
class Sampling:
    """What both endpoints share: how to sample and when to stop."""

    temperature: float
    top_k: int | None
    top_p: float | None
    max_tokens: int
    n: int
    seed: int | None
    stream: bool
    include_usage: bool
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: off; else the number of alternatives per token (0-20)
    repetition_penalty: float | None = None  # > 1 discourages the last 64 generated tokens; None or 1: off


@dataclass
class ChatRequest(Sampling):
    conversation: dict = field(default_factory=dict)  # {"messages": [...]} in picochat's format, validated
    origin: list[int] = field(default_factory=list)  # index in the request of each message of `conversation`

    def request_messages_dropped(self, dropped: int) -> int:
        """The request's messages left out when the first `dropped` turns of `conversation` (after the
        system message) are: a tool result and the assistant text after it merge into one turn."""
        first = 1 if self.conversation["messages"][0]["role"] == "system" else 0
        return self.origin[first + dropped] - self.origin[first]


@dataclass
class CompletionRequest(Sampling):
    prompts: list[str | list[int]] = field(default_factory=list)
    echo: bool = False


class APIError(Exception):
    """An error answered as {"error": {...}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw, parse_constant=_reject_constant)  # NaN / Infinity are not JSON
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad(f"request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise _bad("request body is nested too deeply to parse; send flat JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise _bad(f"request body must be a JSON object, got {type(body).__name__}")
    return body


# ---- fields -----------------------------------------------------------------------------------

_SHARED = {"model", "temperature", "top_p", "top_k", "n", "max_tokens", "seed", "stream", "stream_options", "stop",
           "logprobs", "user", "frequency_penalty", "presence_penalty", "logit_bias", "repetition_penalty"}
_CHAT = _SHARED | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
                   "response_format", "store", "metadata"}
_COMPLETION = _SHARED | {"prompt", "echo", "suffix", "best_of"}

# field: (accepted no-op values, why anything else is refused)
_NO_OP = {
    "frequency_penalty": ((0, 0.0), "picochat has no frequency penalty; send 0 or leave it out"),
    "presence_penalty": ((0, 0.0), "picochat has no presence penalty; send 0 or leave it out"),
    "logit_bias": (({},), "picochat does not support logit_bias; send {} or leave it out"),
    "response_format": (({"type": "text"},), "picochat writes plain text only; send {\"type\": \"text\"} or leave it out"),
    "store": ((False,), "picochat stores no completions; send false or leave it out"),
    "metadata": ((), "picochat stores no completions, so it takes no metadata; leave it out"),
    "tool_choice": (("none",), ("picochat's model calls only its built-in calculator, by itself; tool_choice may "
                               "only be \"none\"")),
    "parallel_tool_calls": ((), "picochat takes no client tools, so parallel_tool_calls does not apply; leave it out"),
    "suffix": ((), "picochat does not support suffix (insertion); leave it out"),
}


def _check_fields(body: dict, known: set[str]) -> None:
    for name in body:
        if name not in known:
            raise _bad(f"unrecognized request field '{name}'; picochat does not implement it (see the README's API "
                       "section for the fields it takes)", name, "unknown_parameter")
    for name, (ok, why) in _NO_OP.items():
        value = body.get(name)
        if name in known and value is not None and not any(
                value == v and isinstance(value, bool) == isinstance(v, bool) for v in ok):
            raise _bad(f"'{name}' = {json.dumps(value)[:60]} is not supported: {why}", name, "unsupported_parameter")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _bad("'user' must be a string (an end-user id)", "user")
    if body.get("tools") is not None:
        raise _bad("'tools' is not supported: picochat's model was trained only for its built-in calculator, which "
                   "it calls by itself (reported in each choice's 'picochat' field); remove 'tools'",
                   "tools", "unsupported_parameter")


def _number(body: dict, name: str, default: float | None, lo: float, hi: float,
            integer: bool = False, lo_open: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise _bad(f"'{name}' must be {kind}, got {json.dumps(value)[:40]}", name)
    # a float may be inf or NaN (math.isfinite of a huge JSON integer would raise OverflowError)
    if (isinstance(value, float) and not math.isfinite(value)) or value < lo or value > hi or (lo_open and value == lo):
        low = f"> {lo}" if lo_open else f">= {lo}"
        raise _bad(f"'{name}' must be {low} and <= {hi}, got {str(value)[:40]}", name)
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise _bad(f"'{name}' must be true or false", name)
    return bool(value)


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or not 1 <= len(stops) <= MAX_STOPS:
        raise _bad(f"'stop' must be a non-empty string or a list of 1 to {MAX_STOPS} non-empty strings", "stop")
    if any(len(s) > 256 for s in stops):
        raise _bad("each 'stop' string must be at most 256 characters", "stop")
    return stops


def _sampling(body: dict, limits: Limits, defaults: Defaults, model_ids: tuple[str, ...], min_tokens: int = 1) -> dict:
    """The fields both endpoints share, checked; returns Sampling's keyword arguments."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad(f"'model' must be a string, got {json.dumps(model)[:40]}", "model")
    if model is not None and model not in model_ids:
        raise APIError(404, f"model {json.dumps(model)[:60]} does not exist; GET /v1/models lists {list(model_ids)}",
                       "model", "model_not_found")
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    # include_obfuscation (random padding against length side channels) changes no content: accepted, unused
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}
                                or not all(isinstance(v, bool) for v in options.values())):
        raise _bad("'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
    seed = body.get("seed")
    # OpenAI's range, int64; torch seeds a generator with it modulo 2**64, so each seed is its own
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**63):
        raise _bad("'seed' must be an integer in [-2**63, 2**63)", "seed")
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise _bad("'max_tokens' and 'max_completion_tokens' cannot both be set: send one (max_tokens is the older "
                   "name of max_completion_tokens)", "max_tokens", "invalid_parameter_combination")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return {  # checked in this order: the first bad field is the one reported
        "max_tokens": _number(body, name, defaults.max_tokens, min_tokens, limits.max_tokens, integer=True),
        # top_k 0 means no top-k
        "top_k": _number(body, "top_k", defaults.top_k, 0, limits.max_top_k, integer=True) or None,
        "temperature": float(_number(body, "temperature", defaults.temperature, 0.0, 2.0)),
        "top_p": _number(body, "top_p", None, 0.0, 1.0, lo_open=True),
        "n": _number(body, "n", 1, 1, limits.max_n, integer=True),
        "seed": seed, "stream": stream, "include_usage": bool(options and options.get("include_usage")),
        "stop": _stop(body),
        "repetition_penalty": _number(body, "repetition_penalty", defaults.repetition_penalty, 0.0, 10.0, lo_open=True),
    }


def parse_chat_request(body: dict, limits: Limits, defaults: Defaults, model_ids: tuple[str, ...]) -> ChatRequest:
    _check_fields(body, _CHAT)
    sampling = _sampling(body, limits, defaults, model_ids)
    logprobs = _flag(body, "logprobs")
    top = _number(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
    if top is not None and not logprobs:
        raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    messages, origin = _messages(body, limits)
    return ChatRequest(**sampling, logprobs=(top or 0) if logprobs else None,
                       conversation={"messages": messages}, origin=origin)


def parse_completion_request(body: dict, limits: Limits, defaults: Defaults,
                             model_ids: tuple[str, ...]) -> CompletionRequest:
    _check_fields(body, _COMPLETION)
    echo = _flag(body, "echo")
    # OpenAI's legacy default is 16 tokens; 0 is allowed with echo (score the prompt only).
    sampling = _sampling(body, limits, Defaults(defaults.temperature, defaults.top_k, 16), model_ids,
                         min_tokens=0 if echo else 1)
    if sampling["max_tokens"] == 0 and sampling["stream"]:
        raise _bad("'max_tokens': 0 (scoring only) cannot stream; set stream to false", "max_tokens")
    logprobs = _number(body, "logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
    # best_of candidates, the best n returned: best_of == n returns every candidate, which is n alone
    best_of = _number(body, "best_of", sampling["n"], 1, limits.max_n, integer=True)
    if best_of < sampling["n"]:
        raise _bad(f"'best_of' ({best_of}) must be >= n ({sampling['n']}): it is how many candidates the n choices "
                   "are picked from", "best_of")
    if best_of > sampling["n"]:
        raise _bad("'best_of' > n is not supported: picochat does not rank candidates; leave best_of out, or set it "
                   "to n", "best_of", "unsupported_parameter")
    return CompletionRequest(**sampling, logprobs=logprobs, prompts=_prompts(body, limits), echo=echo)


def _prompts(body: dict, limits: Limits) -> list[str | list[int]]:
    """`prompt` as a list of prompts: a string, a list of strings, token ids, or a list of id lists."""
    prompt = body.get("prompt")
    shape = "'prompt' must be a string, a list of strings, a list of token ids, or a list of token-id lists"
    if prompt is None:
        raise _bad("'prompt' is required", "prompt")
    prompts = [prompt] if isinstance(prompt, str) or _is_ids(prompt) else prompt
    if not isinstance(prompts, list) or not prompts:
        raise _bad(shape, "prompt")
    if len(prompts) > limits.max_prompts:
        raise _bad(f"'prompt' holds {len(prompts)} prompts; the limit is {limits.max_prompts}", "prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) and not _is_ids(p):  # "" is a new document: <|bos|> alone
            raise _bad(f"prompt {i} is of the wrong type or an empty list; {shape}", f"prompt.{i}" if len(prompts) > 1 else "prompt")
        if isinstance(p, str) and len(p) > limits.max_total_chars:
            raise _bad(f"prompt {i} has {len(p)} characters; the limit is {limits.max_total_chars}", "prompt",
                       "context_length_exceeded")
    return prompts


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


# ---- messages ---------------------------------------------------------------------------------

_MESSAGE_KEYS = {"role", "content", "tool_calls", "tool_call_id"}
# A client that appends a reply it got to the history sends these back: OpenAI's reply fields that
# picochat leaves null, and picochat's own extension (whose parts the content already holds).
_NULL_REPLY_KEYS = {"refusal", "annotations", "audio", "function_call"}


def _sent_back(role: str, key: str, value: Any) -> bool:
    """Whether `key` is a field of picochat's own reply, sent back unchanged in an assistant message."""
    return role == "assistant" and (key == "picochat" or (key in _NULL_REPLY_KEYS and value is None))


def _content_text(content: Any, param: str, role: str) -> str | list[dict]:
    """A message's content: a string, or a list of {"type", "text"} parts (OpenAI's content array)."""
    if isinstance(content, str) and role == "assistant":
        # "" is a reply that ended at once (or at a stop string): the empty turn the model wrote
        return parse_display_text(content) if content else [{"type": "text", "text": ""}]
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise _bad("'content' must be a non-empty string or a non-empty list of text parts", param)
    allowed = ("text", "python", "python_output") if role == "assistant" else ("text",)
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if isinstance(kind, str) and kind not in allowed:  # image_url, input_audio, file, ...
            raise _bad(f"content part {j} has type {json.dumps(kind)[:40]}, which picochat does not take: its model "
                       f"reads text only; send parts of type {list(allowed)}", f"{param}.{j}", "unsupported_content_type")
        if not isinstance(part, dict) or part.get("type") not in allowed or not isinstance(part.get("text"), str):
            raise _bad(f"content part {j} must be {{\"type\": one of {list(allowed)}, \"text\": string}}", f"{param}.{j}")
        parts.append({"type": part["type"], "text": part["text"]})
    return parts if role == "assistant" else "".join(p["text"] for p in parts)


def _as_parts(content: str | list[dict]) -> list[dict]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def _calculator_calls(calls: Any, param: str) -> list[dict]:
    """An assistant message's `tool_calls` as python parts (only picochat's calculator exists)."""
    if not isinstance(calls, list) or not calls:
        raise _bad("'tool_calls' must be a non-empty list", param)
    parts = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        try:
            args = json.loads(fn["arguments"]) if isinstance(fn, dict) and isinstance(fn.get("arguments"), str) else None
        except ValueError:
            args = None
        if (not isinstance(fn, dict) or fn.get("name") != "calculator" or not isinstance(args, dict)
                or not isinstance(args.get("expression"), str) or call.get("type", "function") != "function"):
            raise _bad("a tool call must be {\"type\": \"function\", \"function\": {\"name\": \"calculator\", "
                       "\"arguments\": \"{\\\"expression\\\": ...}\"}}: the calculator is picochat's only tool",
                       f"{param}.{j}")
        parts.append({"type": "python", "text": args["expression"]})
    return parts


def _merge_message(out: list[dict], m: dict, i: int, limits: Limits) -> int:
    """Append message `m` (index i) to `out` in picochat's format; returns its character count."""
    param = f"messages.{i}"
    role = m.get("role")
    if role not in ("system", "developer", "user", "assistant", "tool"):
        raise _bad(f"message {i} has role {json.dumps(role)[:40]}; roles are system, developer, user, assistant, tool",
                   f"{param}.role")
    if extra := sorted(k for k in set(m) - _MESSAGE_KEYS if not _sent_back(role, k, m[k])):
        raise _bad(f"message {i} has the field '{extra[0]}', which picochat does not implement", f"{param}.{extra[0]}")
    if role != "assistant" and m.get("tool_calls") is not None:
        raise _bad(f"message {i}: only assistant messages carry 'tool_calls'", f"{param}.tool_calls")
    calls = _calculator_calls(m["tool_calls"], f"{param}.tool_calls") if m.get("tool_calls") is not None else []
    if m.get("content") is None and not calls:
        raise _bad(f"message {i} has no 'content'", f"{param}.content")
    content = _content_text(m["content"], f"{param}.content", role) if m.get("content") is not None else []
    chars = len(content) if isinstance(content, str) else sum(len(p["text"]) for p in content)
    if chars > limits.max_message_chars:
        raise _bad(f"message {i} has {chars} characters; the limit is {limits.max_message_chars}",
                   f"{param}.content", "message_too_long")
    previous = out[-1] if out else None
    if role == "tool":
        parts = previous["content"] if previous and previous["role"] == "assistant" else None
        if not isinstance(parts, list) or not parts or parts[-1]["type"] != "python":
            raise _bad(f"message {i}: a tool message must follow the assistant's calculator call (a tool call or a "
                       "'<<expr>>' at the end of its content)", f"{param}.role")
        parts.append({"type": "python_output", "text": content})
    elif role == "assistant" and previous is not None and previous.get("after_tool"):
        previous["content"] += _as_parts(content) + calls  # the same turn goes on after the tool's result
    elif role == "assistant":
        out.append({"role": "assistant", "content": content if not calls else _as_parts(content) + calls})
    elif role in ("system", "developer") and out and out[-1]["role"] == "system":
        out[-1]["content"] += f"\n\n{content}"  # instructions given in several messages up front
    else:
        out.append({"role": "system" if role == "developer" else role, "content": content})
    if out and out[-1]["role"] == "assistant":
        out[-1]["after_tool"] = role == "tool"
    return chars


def _messages(body: dict, limits: Limits) -> tuple[list[dict], list[int]]:
    """The request's messages in picochat's format, and the request index each of them starts at."""
    messages = body.get("messages")
    if messages is None:
        raise _bad("'messages' is required", "messages")
    if not isinstance(messages, list):
        raise _bad("'messages' must be a list", "messages")
    if not 1 <= len(messages) <= limits.max_messages:
        raise _bad(f"'messages' must hold 1 to {limits.max_messages} messages, got {len(messages)}", "messages")
    out: list[dict] = []
    origin: list[int] = []  # index in the request of each message of `out`
    total = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"message {i} must be an object with 'role' and 'content'", f"messages.{i}")
        before = len(out)
        total += _merge_message(out, m, i, limits)
        origin += [i] * (len(out) - before)
    if total > limits.max_total_chars:
        raise _bad(f"the messages hold {total} characters in total; the limit is {limits.max_total_chars}",
                   "messages", "context_length_exceeded")
    for m in out:
        m.pop("after_tool", None)
    try:
        normalize_messages({"messages": out})
    except ConversationError as e:
        param = "messages" if e.index is None else f"messages.{origin[e.index]}"
        raise _bad(str(e), param) from None
    if out[-1]["role"] != "user":
        raise _bad("the last message must be from the user (the model writes the next assistant turn; picochat runs "
                   "the calculator itself, so a tool result never needs to be sent last)",
                   f"messages.{len(messages) - 1}.role")
    return out, origin
