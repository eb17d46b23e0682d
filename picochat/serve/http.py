"""HTTP plumbing that holds against slow clients: a deadline for the request head and for the body.

uvicorn's h11 protocol closes idle keep-alive connections, but a client that sends its request
head a byte at a time, or never finishes its body, holds a connection (and a file descriptor)
forever. `SlowClientProtocol` closes a connection whose request head is not complete within
`HEAD_TIMEOUT_S` of the connection opening (or of the previous response); `read_body` answers
408 when the body is not complete within `body_timeout_s`. `unless_disconnected` stops the work of
a non-streaming answer when its client goes away (a streaming one stops when a write fails).

    uvicorn.Config(app, host, port, **server_options())  # what `picochat serve` and the tests use
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable

import h11
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from uvicorn.protocols.http.h11_impl import H11Protocol

from picochat.serve.requests import APIError

HEAD_TIMEOUT_S = 10.0  # request line and headers
BODY_TIMEOUT_S = 30.0  # the whole body


class SlowClientProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head."""

    head_timeout_s = HEAD_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if (timer := getattr(self, "_head_timer", None)) is not None:
            timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        # Still waiting for (the rest of) a request head: the client is too slow; drop it.
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def server_options() -> dict:
    """uvicorn.Config keyword arguments for the hardened protocol."""
    return {"http": SlowClientProtocol, "timeout_keep_alive": 5}


async def read_body(request: Request, limit: int, timeout_s: float = BODY_TIMEOUT_S) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` bytes, and with 408
    when it has not fully arrived within `timeout_s`."""
    too_big = APIError(413, f"request body is larger than {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), max(0.0, deadline - loop.time()))
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {timeout_s:g} s", code="request_timeout") from None
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


CLIENT_CLOSED = 499  # the status logged for an answer whose client went away (nobody receives it)


async def unless_disconnected(request: Request, answer: Awaitable[dict], headers: dict | None = None) -> Response:
    """`answer` as a JSON response; if the client disconnects first, `answer` is cancelled (its
    generation stops, as a streaming one does) and an empty 499 is returned. Call it after the body
    was read: the ASGI receive channel then only reports the disconnect."""
    work = asyncio.ensure_future(answer)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not work.done():
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(work.result(), headers=headers)
