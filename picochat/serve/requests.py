"""Validation of OpenAI-style chat completion requests, with OpenAI-style errors.

Every check names the offending field (`param`) so a client sees exactly what to fix:
    {"error": {"message": "...", "type": "invalid_request_error", "param": "messages.2.role", "code": null}}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from picochat.infer.streaming import parse_display_text
from picochat.tokenizer.chat import ConversationError, normalize_messages


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1_000_000
    max_messages: int = 500
    max_message_chars: int = 8_000
    max_total_chars: int = 32_000
    max_tokens: int = 4_096
    max_n: int = 8
    max_top_k: int = 200


@dataclass(frozen=True)
class Defaults:
    temperature: float = 0.8
    top_k: int = 50
    max_tokens: int = 512


@dataclass
class ChatRequest:
    conversation: dict  # {"messages": [...]} in picochat's format, validated
    temperature: float
    top_k: int | None
    top_p: float | None
    max_tokens: int
    n: int
    seed: int | None
    stream: bool
    include_usage: bool


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
    if not isinstance(body, dict):
        raise _bad(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _number(body: dict, name: str, default: float | None, lo: float, hi: float,
            integer: bool = False, lo_open: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise _bad(f"'{name}' must be {kind}, got {json.dumps(value)[:40]}", name)
    if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo):
        low = f"> {lo}" if lo_open else f">= {lo}"
        raise _bad(f"'{name}' must be {low} and <= {hi}, got {value}", name)
    return value


def _content_text(content: Any, param: str, role: str) -> str | list[dict]:
    """A message's content: a string, or a list of {"type", "text"} parts (OpenAI's content array)."""
    if isinstance(content, str):
        return parse_display_text(content) if role == "assistant" else content
    if not isinstance(content, list) or not content:
        raise _bad("'content' must be a non-empty string or a non-empty list of text parts", param)
    allowed = ("text", "python", "python_output") if role == "assistant" else ("text",)
    parts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in allowed or not isinstance(part.get("text"), str):
            raise _bad(f"content part {j} must be {{\"type\": one of {list(allowed)}, \"text\": string}}", f"{param}.{j}")
        parts.append({"type": part["type"], "text": part["text"]})
    if role != "assistant":
        return "".join(p["text"] for p in parts)
    return parts


def _messages(body: dict, limits: Limits) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise _bad("'messages' is required", "messages")
    if not isinstance(messages, list):
        raise _bad("'messages' must be a list", "messages")
    if not 1 <= len(messages) <= limits.max_messages:
        raise _bad(f"'messages' must hold 1 to {limits.max_messages} messages, got {len(messages)}", "messages")
    out, total = [], 0
    for i, m in enumerate(messages):
        param = f"messages.{i}"
        if not isinstance(m, dict):
            raise _bad(f"message {i} must be an object with 'role' and 'content'", param)
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise _bad(f"message {i} has role {json.dumps(role)[:40]}; roles are system, user, assistant",
                       f"{param}.role")
        if "content" not in m or m["content"] is None:
            raise _bad(f"message {i} has no 'content'", f"{param}.content")
        content = _content_text(m["content"], f"{param}.content", role)
        chars = len(content) if isinstance(content, str) else sum(len(p["text"]) for p in content)
        if chars > limits.max_message_chars:
            raise _bad(f"message {i} has {chars} characters; the limit is {limits.max_message_chars}",
                       f"{param}.content", "message_too_long")
        total += chars
        out.append({"role": role, "content": content})
    if total > limits.max_total_chars:
        raise _bad(f"the messages hold {total} characters in total; the limit is {limits.max_total_chars}",
                   "messages", "context_too_long")
    try:
        normalize_messages({"messages": out})
    except ConversationError as e:
        param = "messages" if e.index is None else f"messages.{e.index}"
        raise _bad(str(e), param) from None
    if out[-1]["role"] != "user":
        raise _bad("the last message must be from the user (the model writes the next assistant turn)",
                   f"messages.{len(out) - 1}.role")
    return out


def parse_chat_request(body: dict, limits: Limits, defaults: Defaults, model_ids: tuple[str, ...]) -> ChatRequest:
    model = body.get("model")
    if model is not None and model not in model_ids:
        raise APIError(404, f"model {json.dumps(model)[:60]} does not exist; GET /v1/models lists {list(model_ids)}",
                       "model", "model_not_found")
    if body.get("stop") is not None:
        raise _bad("'stop' is not supported; generation stops at the end of the assistant turn", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool)):
        raise _bad("'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise _bad("'seed' must be an integer in [0, 2**63)", "seed")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", defaults.max_tokens, 1, limits.max_tokens, integer=True)
    top_k = _number(body, "top_k", defaults.top_k, 0, limits.max_top_k, integer=True)
    top_p = _number(body, "top_p", None, 0.0, 1.0, lo_open=True)
    return ChatRequest(
        conversation={"messages": _messages(body, limits)},
        temperature=float(_number(body, "temperature", defaults.temperature, 0.0, 2.0)),
        top_k=top_k or None,  # 0 means no top-k
        top_p=top_p,
        max_tokens=max_tokens,
        n=_number(body, "n", 1, 1, limits.max_n, integer=True),
        seed=seed,
        stream=stream,
        include_usage=bool(options and options.get("include_usage")),
    )
