"""The server against hostile or careless input: JSON nested too deep, clients that send their
request head or body too slowly, and `serve` flags no request could use."""

import socket
import time

import httpx
import pytest

from picochat.cli import main
from picochat.errors import ConfigError
from picochat.serve import http as serve_http
from picochat.serve.app import create_app
from picochat.serve.commands import build_app
from picochat.serve.pool import WorkerPool
from tests.serve.conftest import ServerThread, serve_args


@pytest.fixture
def bare_server(monkeypatch):
    """A server with no model behind it (every check here happens before generation), and short
    deadlines: 0.5 s for a request head, 0.5 s for a body."""
    monkeypatch.setattr(serve_http.SlowClientProtocol, "head_timeout_s", 0.5)
    with ServerThread(create_app(WorkerPool([object()], max_queue=0), "m", body_timeout_s=0.5)) as srv:
        yield srv


def test_json_nested_too_deep_is_a_json_400(bare_server):
    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000):
        response = httpx.post(f"{bare_server.url}/v1/chat/completions", content=raw, timeout=30,
                              headers={"Content-Type": "application/json"})
        assert response.status_code == 400
        assert "nested too deeply" in response.json()["error"]["message"]
    assert httpx.get(f"{bare_server.url}/health").json()["status"] == "ok"


def closed_by_server(sock: socket.socket, within_s: float) -> bool:
    sock.settimeout(within_s)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False


def test_slow_request_heads_are_dropped(bare_server):
    sockets = []
    for _ in range(40):
        s = socket.create_connection(("127.0.0.1", bare_server.port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # and never the end of the head
        sockets.append(s)
    idle = socket.create_connection(("127.0.0.1", bare_server.port))  # sends nothing at all
    try:
        assert all(closed_by_server(s, 5) for s in [*sockets, idle])
    finally:
        for s in [*sockets, idle]:
            s.close()
    assert httpx.get(f"{bare_server.url}/health").status_code == 200


def read_reply(s: socket.socket) -> bytes:
    s.settimeout(5)
    reply = b""
    while b'"code"' not in reply and (chunk := s.recv(4096)):
        reply += chunk
    return reply


def test_slow_bodies_get_408(bare_server):
    sockets = []
    start = time.monotonic()
    for _ in range(40):
        s = socket.create_connection(("127.0.0.1", bare_server.port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"messages\":")  # and never the rest of the body
        sockets.append(s)
    try:
        replies = [read_reply(s) for s in sockets]
    finally:
        for s in sockets:
            s.close()
    assert time.monotonic() - start < 10
    for reply in replies:
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b'"code":"request_timeout"' in body


def test_a_streaming_reply_is_not_cut_by_the_head_deadline(monkeypatch):
    """The head deadline is for reading the request only; a long response is not affected."""
    import asyncio

    from fastapi.responses import StreamingResponse

    monkeypatch.setattr(serve_http.SlowClientProtocol, "head_timeout_s", 0.3)
    app = create_app(WorkerPool([object()], max_queue=0), "m")

    async def slow():
        for i in range(4):
            await asyncio.sleep(0.3)
            yield f"data: {i}\n\n"

    app.add_api_route("/slow", lambda: StreamingResponse(slow(), media_type="text/event-stream"))
    with ServerThread(app) as srv:
        assert httpx.get(f"{srv.url}/slow", timeout=10).text == "".join(f"data: {i}\n\n" for i in range(4))


@pytest.mark.parametrize("flags, culprit", [
    (["--temperature", "-5"], "--temperature -5"), (["--temperature", "2.5"], "--temperature 2.5"),
    (["--top-k", "-7"], "--top-k -7"), (["--top-k", "1000"], "--top-k 1000"),
    (["--max-tokens", "-3"], "--max-tokens -3"), (["--max-tokens", "0"], "--max-tokens 0"),
    (["--port", "-1"], "--port -1"), (["--port", "70000"], "--port 70000"), (["--api-key", " "], "--api-key"),
])
def test_serve_refuses_flags_no_request_could_use(flags, culprit):
    with pytest.raises(ConfigError, match=culprit.replace("-", r"\-").replace(".", r"\.")):
        build_app(serve_args(*flags))  # before any checkpoint is looked for


def test_a_bad_port_fails_before_serving_on_is_printed(capsys):
    for port in ("-1", "70000"):
        assert main(["serve", "--port", port]) == 2
        captured = capsys.readouterr()
        assert "serving on" not in captured.out and f"--port {port}" in captured.err
