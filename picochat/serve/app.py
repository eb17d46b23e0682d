"""The HTTP server: the chat page and an OpenAI-compatible API over a pool of engines.

    GET  /                     the single-page chat UI (package data, not read from the CWD)
    GET  /health               {"status": "ok", "model", "workers", "busy", "queued", ...}
    GET  /v1/models            the one model served
    POST /v1/chat/completions  OpenAI wire format, streaming (SSE chat.completion.chunk frames,
                               `data: [DONE]`, stream_options.include_usage) or not

Errors are OpenAI-shaped JSON (`{"error": {"message", "type", "param", "code"}}`): 400 for a bad
request, 404 for an unknown model or path, 413 for an oversized body, 503 + Retry-After when every
worker is busy and the queue is full. Tool use is visible in the text as `<<expr=result>>` and, for
the web page, in each chunk's extra `delta.picochat` = {"type": "text"|"python"|"python_output", "text"}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from picochat.serve.pool import Delta, Finish, PoolFull, Usage, WorkerPool, run_generation
from picochat.serve.requests import APIError, ChatRequest, Defaults, Limits, parse_body, parse_chat_request

_END = object()


class _Failure:
    def __init__(self, message: str):
        self.message = message


def index_html() -> str:
    return resources.files("picochat.serve").joinpath("static", "index.html").read_text(encoding="utf-8")


def create_app(pool: WorkerPool, model_id: str, limits: Limits | None = None, defaults: Defaults | None = None,
               retry_after_s: int = 2) -> FastAPI:
    limits, defaults = limits or Limits(), defaults or Defaults()
    model_ids = (model_id, "picochat")
    created = int(time.time())
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        pool.shutdown()  # the server stops: end the generation threads before the process exits

    app = FastAPI(title="picochat", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.pool = pool
    app.state.cancelled = 0  # generations stopped because the client went away

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        headers = {"Retry-After": str(retry_after_s)} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), type_=kind).body(), status_code=e.status_code)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(index_html())

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_id, **pool.stats()}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "picochat"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = parse_body(await _read_body(request, limits.max_body_bytes))
        chat = parse_chat_request(body, limits, defaults, model_ids)
        try:
            engine = await pool.acquire()
        except PoolFull:
            raise APIError(503, "the server is busy: every worker is generating and the queue is full; retry later",
                           code="server_busy", type_="server_error") from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def emit(event: object) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        def work() -> None:
            try:
                run_generation(engine, chat, emit, cancel)
            except Exception as e:  # noqa: BLE001 - any failure is reported to the client (error frame / 500)
                emit(_Failure(f"generation failed: {type(e).__name__}: {e}"))
            finally:
                emit(_END)

        future = loop.run_in_executor(pool.executor, work)
        future.add_done_callback(lambda _: pool.release(engine))

        def on_close(finished: bool) -> None:
            if not finished and not cancel.is_set():
                app.state.cancelled += 1
            cancel.set()

        header = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}
        if chat.stream:
            return StreamingResponse(_sse(chat, header, events, on_close), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _collect(chat, header, events, on_close)

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    too_big = APIError(413, f"request body is larger than {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def _sse(chat: ChatRequest, header: dict, events: asyncio.Queue, on_close):
    """chat.completion.chunk frames: a role frame per choice, content deltas, a finish frame per choice,
    the usage frame if asked for, then [DONE]."""
    usage = None
    finished = False

    def frame(choices: list[dict], usage_value: dict | None = None) -> str:
        obj = {**header, "object": "chat.completion.chunk", "choices": choices}
        if chat.include_usage:
            obj["usage"] = usage_value
        return f"data: {json.dumps(obj)}\n\n"

    try:
        for i in range(chat.n):
            yield frame([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        while (event := await events.get()) is not _END:
            if isinstance(event, Delta):
                delta = {"content": event.piece.display, "picochat": {"type": event.piece.kind, "text": event.piece.text}}
                yield frame([{"index": event.index, "delta": delta, "finish_reason": None}])
            elif isinstance(event, Finish):
                yield frame([{"index": event.index, "delta": {}, "finish_reason": event.reason}])
            elif isinstance(event, Usage):
                usage = _usage(event)
            elif isinstance(event, _Failure):
                error = APIError(500, event.message, type_="server_error").body()
                yield f"data: {json.dumps(error)}\n\n"
        if chat.include_usage and usage is not None:
            yield frame([], usage)
        yield "data: [DONE]\n\n"
        finished = True
    finally:
        on_close(finished)


async def _collect(chat: ChatRequest, header: dict, events: asyncio.Queue, on_close) -> JSONResponse:
    content = [""] * chat.n
    reasons: list[str | None] = [None] * chat.n
    usage = None
    finished = False
    try:
        while (event := await events.get()) is not _END:
            if isinstance(event, Delta):
                content[event.index] += event.piece.display
            elif isinstance(event, Finish):
                reasons[event.index] = event.reason
            elif isinstance(event, Usage):
                usage = _usage(event)
            elif isinstance(event, _Failure):
                raise APIError(500, event.message, type_="server_error")
        finished = True
    finally:
        on_close(finished)
    choices = [{"index": i, "message": {"role": "assistant", "content": content[i]}, "finish_reason": reasons[i]}
               for i in range(chat.n)]
    return JSONResponse({**header, "object": "chat.completion", "choices": choices, "usage": usage})


def _usage(event: Usage) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}
