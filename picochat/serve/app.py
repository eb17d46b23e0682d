"""The HTTP server: the chat page and an OpenAI-compatible API over a pool of engines.

    GET  /                     the single-page chat UI (package data, not read from the CWD)
    GET  /health               {"status": "ok", "model", "workers", "busy", "queued", "auth", ...}
    GET  /v1/models            the one model served;  GET /v1/models/{id}: that model
    POST /v1/chat/completions  OpenAI wire format, streaming (SSE chat.completion.chunk frames,
                               `data: [DONE]`, stream_options.include_usage) or not
    POST /v1/completions       the raw model (no chat template, no calculator), see completions.py
    GET  /tokenizer_info, POST /tokenize, POST /detokenize   the server's own token ids (the routes
                               lm-evaluation-harness's remote tokenizer calls)

Errors are OpenAI-shaped JSON (`{"error": {"message", "type", "param", "code"}}`): 400 for a bad
request, 401 for a missing or wrong API key (`--api-key`), 404 for an unknown model or path, 408
for a body that does not arrive in time, 413 for an oversized body, 415 for a body not sent as
`Content-Type: application/json` (a web page can send text/plain or a form to a local server
without the browser asking the server first), 503 + Retry-After when every worker is busy and the
queue is full.

Tool use: the model calls its calculator itself, mid-turn, and the server runs it. That is not
OpenAI's `tool_calls` (which asks the client to run a function and send back the result, and
ends the turn with finish_reason "tool_calls"), so it is reported in an extension field that
OpenAI clients ignore: `message.picochat = {"parts": [...], "calculator_calls": [{"expression",
"result"}]}` (each chunk's `delta.picochat` = {"type": "text"|"python"|"python_output", "text"}
when streaming). `content` shows each call inline as `<<expr=result>>`.

Long chats: the oldest user/assistant pairs that do not fit the context are dropped (the system
text and the newest turns stay). How many is in `usage.dropped_messages` and in the response
header `X-Picochat-Dropped-Messages`; a last message that cannot fit is 400
`context_length_exceeded`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
import time
import uuid
from dataclasses import asdict
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from picochat.errors import UserError
from picochat.infer.prompt import ContextLengthError, encode_raw_prompt, fit_turns
from picochat.serve.completions import completion_response, completion_sse, prepare_completion
from picochat.serve.http import BODY_TIMEOUT_S, read_body, unless_disconnected
from picochat.serve.pool import (
    END,
    Delta,
    Failure,
    Finish,
    Generation,
    PoolFull,
    Usage,
    WorkerPool,
    run_generation,
)
from picochat.serve.requests import (
    APIError,
    ChatRequest,
    Defaults,
    Limits,
    parse_body,
    parse_chat_request,
    parse_completion_request,
)

DROPPED_HEADER = "X-Picochat-Dropped-Messages"


def create_app(pool: WorkerPool, model_id: str, limits: Limits | None = None, defaults: Defaults | None = None,
               retry_after_s: int = 2, api_key: str | None = None, body_timeout_s: float = BODY_TIMEOUT_S) -> FastAPI:
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

    if api_key:
        app.add_middleware(RequireKey, key=api_key)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        headers = {"Retry-After": str(retry_after_s)} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), type_=kind).body(), status_code=e.status_code)

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "picochat"}

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        page = resources.files("picochat.serve").joinpath("static", "index.html")  # package data, not the CWD
        return HTMLResponse(page.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_id, "auth": bool(api_key), **pool.stats(),
                "defaults": asdict(defaults)}  # the sampling defaults of requests that give none

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        if name not in model_ids:
            raise APIError(404, f"model {json.dumps(name)[:60]} does not exist; GET /v1/models lists {list(model_ids)}",
                           "model", "model_not_found")
        return model_card()

    async def body_of(request: Request) -> dict:
        raw = await read_body(request, limits.max_body_bytes, body_timeout_s)
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise APIError(415, f"the body must be sent as 'Content-Type: application/json', not "
                           f"{json.dumps(media_type or None)[:60]}", code="unsupported_media_type")
        return parse_body(raw)

    engine = pool.engines[0]  # every worker has the same tokenizer and context
    _generation_routes(app, engine, model_id, model_ids, body_of, limits, defaults)
    _tokenizer_routes(app, engine, body_of)
    return app


def _generation_routes(app: FastAPI, engine, model_id: str, model_ids: tuple[str, ...], body_of,
                       limits: Limits, defaults: Defaults) -> None:
    """POST /v1/chat/completions and /v1/completions."""

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        chat = parse_chat_request(await body_of(request), limits, defaults, model_ids)
        budget = max(engine.context_len - chat.max_tokens, engine.context_len // 2)
        try:
            fitted = await asyncio.to_thread(fit_turns, engine.tokenizer, chat.conversation, budget)
        except ContextLengthError as e:
            raise APIError(400, str(e), "messages", "context_length_exceeded") from None
        dropped = chat.request_messages_dropped(fitted.dropped)  # counted in the request's messages
        events, on_close = await _start(app, [Generation(fitted.ids, chat)])
        header = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}
        headers = {DROPPED_HEADER: str(dropped)}
        if chat.stream:
            return StreamingResponse(_chat_sse(chat, header, events, on_close, dropped, engine.tokenizer),
                                     media_type="text/event-stream", headers={**headers, **_SSE_HEADERS})
        return await unless_disconnected(
            request, _chat_collect(chat, header, events, on_close, engine.tokenizer, dropped), headers)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse_completion_request(await body_of(request), limits, defaults, model_ids)
        prompts = prepare_completion(engine.tokenizer, engine.context_len, req)
        header = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}
        jobs = [Generation(p.ids, req, first_index=i * req.n, use_tools=False, raw_text=True)
                for i, p in enumerate(prompts)]
        events, on_close = await _start(app, jobs, scoring=[p for p in prompts if req.echo])
        if req.stream:
            return StreamingResponse(completion_sse(req, prompts, header, events, on_close, engine.tokenizer),
                                     media_type="text/event-stream", headers=_SSE_HEADERS)
        return await unless_disconnected(
            request, completion_response(req, prompts, header, events, on_close, engine.tokenizer))


def _tokenizer_routes(app: FastAPI, engine, body_of) -> None:
    """The server's own token ids: GET /tokenizer_info, POST /tokenize and /detokenize."""

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        return {"tokenizer_class": "picochat", "bos_token": "<|bos|>", "eos_token": "<|assistant_end|>",
                "pad_token": None, "vocab_size": engine.tokenizer.vocab_size, "max_model_len": engine.context_len}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        body = await body_of(request)
        text, special = body.get("prompt"), body.get("add_special_tokens", True)
        if not isinstance(text, str):
            raise APIError(400, "'prompt' must be a string", "prompt")
        if not isinstance(special, bool):
            raise APIError(400, "'add_special_tokens' must be true or false", "add_special_tokens")
        ids = encode_raw_prompt(engine.tokenizer, text)
        if special and (not ids or ids[0] != engine.tokenizer.bos_id):
            ids = [engine.tokenizer.bos_id, *ids]
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.context_len}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        tokens = (await body_of(request)).get("tokens")
        vocab = engine.tokenizer.vocab_size
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                                   for t in tokens):
            raise APIError(400, f"'tokens' must be a list of token ids in [0, {vocab})", "tokens")
        return {"prompt": engine.tokenizer.decode(tokens)}


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class RequireKey:
    """ASGI middleware: /v1/* and the tokenizer routes need `Authorization: Bearer <key>`; the page
    and /health stay open (the page asks for the key when /health says one is needed)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and _needs_key(scope["path"]) and not self._matches(scope):
            error = APIError(401, "missing or incorrect API key: send the header 'Authorization: Bearer <key>' with "
                             "the key the server was started with (--api-key or PICOCHAT_API_KEY)",
                             code="invalid_api_key")
            response = JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _matches(self, scope) -> bool:
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, given = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.key)


def _needs_key(path: str) -> bool:
    return path.startswith("/v1/") or path in ("/tokenizer_info", "/tokenize", "/detokenize")


async def _start(app: FastAPI, jobs: list[Generation], scoring: list | None = None):
    """Take a worker and run `jobs` on it in a thread: (event queue, on_close(finished) callback).

    `scoring`: prompts (completions.PreparedPrompt) whose echoed tokens are scored first."""
    pool = app.state.pool
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
            for prompt in scoring or []:
                prompt.score(getattr(engine, "engine", engine), jobs[0].sampling.logprobs)  # a batcher's own Engine
            for job in jobs:
                if cancel.is_set():
                    return
                if job.sampling.max_tokens > 0:
                    run_generation(engine, job, emit, cancel)
                else:  # scoring only: every choice ends at once
                    for i in range(job.sampling.n):
                        emit(Finish(job.first_index + i, "length"))
                    emit(Usage(len(job.prompt), 0))
        except UserError as e:
            emit(Failure(str(e)))
        except Exception as e:  # noqa: BLE001 - any failure is reported to the client (error frame / 500)
            emit(Failure(f"generation failed: {type(e).__name__}: {e}"))
        finally:
            emit(END)

    loop.run_in_executor(pool.executor, work).add_done_callback(lambda _: pool.release(engine))

    def on_close(finished: bool) -> None:
        if not finished and not cancel.is_set():
            app.state.cancelled += 1
        cancel.set()

    return events, on_close


async def _chat_sse(chat: ChatRequest, header: dict, events: asyncio.Queue, on_close, dropped: int, tokenizer):
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
        while (event := await events.get()) is not END:
            if isinstance(event, Delta):
                delta = {"content": event.piece.display, "picochat": {"type": event.piece.kind, "text": event.piece.text}}
                choice = {"index": event.index, "delta": delta, "finish_reason": None}
                if chat.logprobs is not None:
                    choice["logprobs"] = {"content": [chat_logprob(tokenizer, t) for t in event.logprobs or []],
                                          "refusal": None}
                yield frame([choice])
            elif isinstance(event, Finish):
                yield frame([{"index": event.index, "delta": {}, "finish_reason": event.reason}])
            elif isinstance(event, Usage):
                usage = event.as_dict(dropped)
            elif isinstance(event, Failure):
                yield f"data: {json.dumps(APIError(500, event.message, type_='server_error').body())}\n\n"
        if chat.include_usage and usage is not None:
            yield frame([], usage)
        yield "data: [DONE]\n\n"
        finished = True
    finally:
        on_close(finished)


async def _chat_collect(chat: ChatRequest, header: dict, events: asyncio.Queue, on_close, tokenizer,
                        dropped: int) -> dict:
    choices = [{"index": i, "message": {"role": "assistant", "content": ""}, "finish_reason": None}
               for i in range(chat.n)]
    parts: list[list[dict]] = [[] for _ in range(chat.n)]
    logprobs: list[list[dict]] = [[] for _ in range(chat.n)]
    usage = None
    finished = False
    try:
        while (event := await events.get()) is not END:
            if isinstance(event, Delta):
                choices[event.index]["message"]["content"] += event.piece.display
                _add_part(parts[event.index], event.piece)
                logprobs[event.index] += [chat_logprob(tokenizer, t) for t in event.logprobs or []]
            elif isinstance(event, Finish):
                choices[event.index]["finish_reason"] = event.reason
            elif isinstance(event, Usage):
                usage = event.as_dict(dropped)
            elif isinstance(event, Failure):
                raise APIError(500, event.message, type_="server_error")
        finished = True
    finally:
        on_close(finished)
    for choice, choice_parts, choice_logprobs in zip(choices, parts, logprobs):
        choice["message"]["picochat"] = _extension(choice_parts)
        if chat.logprobs is not None:
            choice["logprobs"] = {"content": choice_logprobs, "refusal": None}
    return {**header, "object": "chat.completion", "choices": choices, "usage": usage}


def _add_part(parts: list[dict], piece) -> None:
    """Grow the message's parts as the web page does: an empty tool piece opens a new part."""
    if parts and parts[-1]["type"] == piece.kind and (piece.text or piece.kind == "text"):
        parts[-1]["text"] += piece.text
    elif piece.text or piece.kind != "text":
        parts.append({"type": piece.kind, "text": piece.text})


def _extension(parts: list[dict]) -> dict:
    """The `picochat` field of a message: its parts and the calculator calls in them."""
    calls = [{"expression": call["text"], "result": out["text"] if out["type"] == "python_output" else None}
             for call, out in zip(parts, [*parts[1:], {"type": None}]) if call["type"] == "python"]
    return {"parts": parts, "calculator_calls": calls}


def chat_logprob(tokenizer, entry) -> dict:
    """One token in the shape of OpenAI's `choices[].logprobs.content[]`."""
    def one(token: int, logprob: float) -> dict:
        raw = tokenizer.decode_bytes([token])
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return {**one(entry.token, entry.logprob), "top_logprobs": [one(t, lp) for t, lp in entry.top]}
