"""Malformed requests get 4xx OpenAI-style JSON errors, and the server keeps serving."""

import json

import httpx
import pytest

USER = [{"role": "user", "content": "hi"}]


def body(**fields):
    return {"messages": USER, "max_tokens": 4, **fields}


# (name, raw body or JSON-able object, expected status, expected param or None)
CASES = [
    ("invalid json", b"{not json", 400, None),
    ("empty body", b"", 400, None),
    ("json array", [1, 2], 400, None),
    ("json string", "hello", 400, None),
    ("NaN literal", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, None),
    ("not utf-8", b"\xff\xfe{}", 400, None),
    ("missing messages", {"max_tokens": 4}, 400, "messages"),
    ("messages not a list", {"messages": "hi"}, 400, "messages"),
    ("empty messages", {"messages": []}, 400, "messages"),
    ("too many messages", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 500
                           + USER}, 400, "messages"),
    ("message not an object", {"messages": ["hi"]}, 400, "messages.0"),
    ("missing role", {"messages": [{"content": "hi"}]}, 400, "messages.0.role"),
    ("unknown role", {"messages": [{"role": "function", "content": "hi"}]}, 400, "messages.0.role"),
    ("tool result with no call", {"messages": [{"role": "tool", "content": "42"}]}, 400, "messages.0.role"),
    ("unknown message field", {"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, 400, "messages.0.name"),
    ("role not a string", {"messages": [{"role": 3, "content": "hi"}]}, 400, "messages.0.role"),
    ("missing content", {"messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ("null content", {"messages": [{"role": "user", "content": None}]}, 400, "messages.0.content"),
    ("numeric content", {"messages": [{"role": "user", "content": 42}]}, 400, "messages.0.content"),
    ("empty content", {"messages": [{"role": "user", "content": ""}]}, 400, "messages.0"),
    ("blank content", {"messages": [{"role": "user", "content": "   "}]}, 400, "messages.0"),
    ("bad content part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
     400, "messages.0.content.0"),
    ("python part from the user", {"messages": [{"role": "user", "content": [{"type": "python", "text": "1+1"}]}]},
     400, "messages.0.content.0"),
    ("message too long", {"messages": [{"role": "user", "content": "x" * 8001}]}, 400, "messages.0.content"),
    ("total too long", {"messages": [{"role": "user", "content": "x" * 8000}, {"role": "assistant", "content": "y" * 8000}]
                        * 13 + USER}, 400, "messages"),
    ("system not first", {"messages": USER + [{"role": "system", "content": "s"}]}, 400, "messages.1"),
    ("two users in a row", {"messages": USER + USER}, 400, "messages.1"),
    ("starts with assistant", {"messages": [{"role": "assistant", "content": "hi"}] + USER}, 400, "messages.0"),
    ("ends with assistant", {"messages": USER + [{"role": "assistant", "content": "yo"}]}, 400, "messages.1.role"),
    ("only a system message", {"messages": [{"role": "system", "content": "s"}]}, 400, "messages"),
    ("temperature string", body(temperature="hot"), 400, "temperature"),
    ("temperature bool", body(temperature=True), 400, "temperature"),
    ("temperature negative", body(temperature=-0.1), 400, "temperature"),
    ("temperature too high", body(temperature=2.5), 400, "temperature"),
    ("top_k negative", body(top_k=-1), 400, "top_k"),
    ("top_k too large", body(top_k=201), 400, "top_k"),
    ("top_k fractional", body(top_k=1.5), 400, "top_k"),
    ("top_p zero", body(top_p=0), 400, "top_p"),
    ("top_p above one", body(top_p=1.5), 400, "top_p"),
    ("max_tokens zero", body(max_tokens=0), 400, "max_tokens"),
    ("max_tokens huge integer", body(max_tokens=10**400), 400, "max_tokens"),
    ("temperature huge integer", body(temperature=10**400), 400, "temperature"),
    ("top_k huge negative integer", body(top_k=-10**400), 400, "top_k"),
    ("max_tokens too large", body(max_tokens=100_000), 400, "max_tokens"),
    ("max_tokens string", body(max_tokens="10"), 400, "max_tokens"),
    ("max_tokens and max_completion_tokens", body(max_completion_tokens=4), 400, "max_tokens"),
    ("bad max_tokens beside max_completion_tokens", body(max_tokens="x", max_completion_tokens=4), 400, "max_tokens"),
    ("n zero", body(n=0), 400, "n"),
    ("n too large", body(n=100), 400, "n"),
    ("stream not bool", body(stream="yes"), 400, "stream"),
    ("stream_options not an object", body(stream=True, stream_options=[1]), 400, "stream_options"),
    ("seed below int64", body(seed=-2**63 - 1), 400, "seed"),
    ("seed above int64", body(seed=2**63), 400, "seed"),
    ("seed string", body(seed="abc"), 400, "seed"),
    ("too many stop strings", body(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("empty stop string", body(stop=""), 400, "stop"),
    ("unknown field", body(best_friend=1), 400, "best_friend"),
    ("client tools", body(tools=[]), 400, "tools"),
    ("tool_choice auto", body(tool_choice="auto"), 400, "tool_choice"),
    ("logprobs not a bool", body(logprobs="yes"), 400, "logprobs"),
    ("unknown model", body(model="gpt-4o"), 404, "model"),
    ("model not a string", body(model={"id": "picochat"}), 400, "model"),
    ("user not a string", body(user=5), 400, "user"),
]


@pytest.mark.parametrize("name, payload, status, param", CASES, ids=[c[0] for c in CASES])
def test_malformed_request(server, name, payload, status, param):
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    response = httpx.post(f"{server.url}/v1/chat/completions", content=raw,
                          headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == ("not_found_error" if status == 404 and param is None
                                                  else "invalid_request_error")
    if param is not None:
        assert error["param"] == param


def test_image_parts_are_refused_as_text_only(server):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    payload = body(messages=[{"role": "user", "content": [{"type": "text", "text": "what is this?"}, image]}])
    response = httpx.post(f"{server.url}/v1/chat/completions", json=payload, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages.0.content.1" and '"image_url"' in error["message"]
    assert "text only" in error["message"]


def test_a_body_not_sent_as_json_is_415(server):
    """Only application/json is read: a page on another site can POST text/plain or a form to a
    local server without the browser asking the server first (no CORS preflight)."""
    raw = json.dumps(body()).encode()
    for content_type in ("text/plain;charset=UTF-8", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": content_type} if content_type else {}
        for path in ("/v1/chat/completions", "/v1/completions", "/tokenize"):
            response = httpx.post(f"{server.url}{path}", content=raw, headers=headers, timeout=30)
            assert response.status_code == 415, (content_type, path, response.text)
            assert response.json()["error"]["code"] == "unsupported_media_type"
    ok = httpx.post(f"{server.url}/v1/chat/completions", content=raw,
                    headers={"Content-Type": "Application/JSON; charset=utf-8"}, timeout=30)
    assert ok.status_code == 200, ok.text


def test_oversized_body_is_413(server):
    raw = json.dumps({"messages": [{"role": "user", "content": "x" * 1_100_000}]}).encode()
    response = httpx.post(f"{server.url}/v1/chat/completions", content=raw, timeout=30)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_oversized_chunked_body_is_413(server):
    def chunks():
        for _ in range(20):
            yield b"x" * 100_000

    response = httpx.post(f"{server.url}/v1/chat/completions", content=chunks(), timeout=30)
    assert response.status_code == 413


def test_wrong_method_and_path(server):
    assert httpx.get(f"{server.url}/v1/chat/completions").status_code == 405
    missing = httpx.get(f"{server.url}/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def test_server_still_serves_after_the_bad_requests(server):
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body(), timeout=30)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["role"] == "assistant"
    assert httpx.get(f"{server.url}/health").json()["busy"] == 0
