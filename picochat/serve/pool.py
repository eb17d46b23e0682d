"""A bounded pool of engines, and one request's generation run in a worker thread.

Each worker is an Engine (one model replica per GPU; on CPU, N engines share one model, which is
read-only at inference). A request takes a free worker, waiting in a bounded queue; when the queue
is full the server answers 503 with Retry-After instead of piling up work. Generation runs in a
thread (torch releases the GIL), sending events back to the event loop, which stays free to serve
other requests; a cancel flag set when the client goes away stops it within one decode step.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from picochat.infer import Engine
from picochat.infer.prompt import fit_conversation
from picochat.infer.streaming import Piece, TextStreamer
from picochat.serve.requests import ChatRequest


class PoolFull(Exception):
    """Every worker is busy and the queue is full."""


class WorkerPool:
    def __init__(self, engines: list[Engine], max_queue: int = 64):
        if not engines:
            raise ValueError("a worker pool needs at least one engine")
        self.engines = engines
        self.max_queue = max_queue
        self.waiting = 0
        self.busy = 0
        self.executor = ThreadPoolExecutor(max_workers=len(engines), thread_name_prefix="picochat-gen")
        self._free: asyncio.Queue | None = None

    async def acquire(self) -> Engine:
        if self._free is None:  # created inside the running loop
            self._free = asyncio.Queue()
            for engine in self.engines:
                self._free.put_nowait(engine)
        if self._free.empty() and self.waiting >= self.max_queue:
            raise PoolFull()
        self.waiting += 1
        try:
            engine = await self._free.get()
        finally:
            self.waiting -= 1
        self.busy += 1
        return engine

    def release(self, engine: Engine) -> None:
        self.busy -= 1
        self._free.put_nowait(engine)

    def stats(self) -> dict:
        return {"workers": len(self.engines), "busy": self.busy, "queued": self.waiting, "max_queue": self.max_queue}

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


@dataclass
class Delta:
    index: int
    piece: Piece


@dataclass
class Finish:
    index: int
    reason: str  # "stop" | "length"


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int


def run_generation(engine: Engine, request: ChatRequest, emit: Callable[[object], None],
                   cancel: threading.Event) -> None:
    """Generate every choice of `request`, emitting Delta / Finish events and a final Usage."""
    context = engine.context_len
    prompt_budget = max(context - request.max_tokens, context // 2)
    prompt = fit_conversation(engine.tokenizer, request.conversation, prompt_budget)
    streamers = [TextStreamer(engine.tokenizer) for _ in range(request.n)]
    done = [False] * request.n
    completion_tokens = 0
    steps = engine.generate(prompt, num_samples=request.n, max_tokens=request.max_tokens,
                            temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
                            seed=request.seed)
    try:
        for column, _ in steps:
            if cancel.is_set():
                return
            for i, token in enumerate(column):
                if token is None or done[i]:
                    continue
                completion_tokens += 1
                if token in engine.stop_tokens:
                    done[i] = True
                    _emit_pieces(emit, i, streamers[i].finish())
                    emit(Finish(i, "stop"))
                else:
                    _emit_pieces(emit, i, streamers[i].push(token))
    finally:
        steps.close()  # frees the KV cache now, also when cancelled
    for i in range(request.n):
        if not done[i]:
            _emit_pieces(emit, i, streamers[i].finish())
            emit(Finish(i, "length"))
    emit(Usage(len(prompt), completion_tokens))


def _emit_pieces(emit: Callable[[object], None], index: int, pieces: list[Piece]) -> None:
    for piece in pieces:
        if piece.display or piece.text:
            emit(Delta(index, piece))
