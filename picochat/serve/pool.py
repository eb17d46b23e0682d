"""A bounded pool of engines, and one request's generation run in a worker thread.

Each worker is an Engine (one model replica per GPU; on CPU, N engines share one model, which is
read-only at inference). Where the engine supports continuous batching (a picochat GPT in fp32 on
the CPU), a worker is a BatchingEngine instead, handed out to `max_batch` requests at once that
share its decode steps (`serving_pool`). A request takes a free handle, waiting in a bounded
queue; when the queue is full the server answers 503 with Retry-After instead of piling up work.
Generation runs in a thread (torch releases the GIL), sending events back to the event loop,
which stays free to serve other requests; a cancel flag set when the client goes away stops it
within one decode step.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from picochat.infer import Engine
from picochat.infer.batching import DONE, BatchingEngine
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

    def replicas(self) -> list:
        """The distinct workers (a batching worker appears once per request it can take)."""
        return list({id(e): e for e in self.engines}.values())

    def stats(self) -> dict:
        return {"workers": len(self.replicas()), "concurrent": len(self.engines), "busy": self.busy,
                "queued": self.waiting, "max_queue": self.max_queue}

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        for worker in self.replicas():
            if isinstance(worker, BatchingEngine):
                worker.close()


def serving_pool(engines: list[Engine], max_batch: int, max_queue: int) -> WorkerPool:
    """A pool over `engines` (one per replica): with max_batch > 1, every engine that supports it
    becomes a BatchingEngine of max_batch rows, taking up to max_batch requests at once."""
    handles: list = []
    for engine in engines:
        if max_batch > 1 and BatchingEngine.supports(engine):
            handles += [BatchingEngine(engine, max_rows=max_batch)] * max_batch
        else:
            handles.append(engine)
    return WorkerPool(handles, max_queue=max_queue)


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


def run_generation(engine: Engine | BatchingEngine, request: ChatRequest, emit: Callable[[object], None],
                   cancel: threading.Event) -> None:
    """Generate every choice of `request`, emitting Delta / Finish events and a final Usage.

    A plain Engine generates in this (worker) thread. A BatchingEngine generates in its scheduler
    thread, which also turns each column into events here (`_Choices.column`), so a token reaches
    the event loop without a hop through this thread; this thread only waits for the end."""
    context = engine.context_len
    prompt_budget = max(context - request.max_tokens, context // 2)
    prompt = fit_conversation(engine.tokenizer, request.conversation, prompt_budget)
    choices = _Choices(engine, request.n, emit)
    options = {"num_samples": request.n, "max_tokens": request.max_tokens, "temperature": request.temperature,
               "top_k": request.top_k, "top_p": request.top_p, "seed": request.seed}
    if isinstance(engine, BatchingEngine):
        if not _run_batched(engine, prompt, options, choices, cancel):
            return
    else:
        steps = engine.generate(prompt, **options)
        try:
            for column, _ in steps:
                if cancel.is_set():
                    return
                choices.column(column)
        finally:
            steps.close()  # frees the KV cache now, also when cancelled
    choices.finish()
    emit(Usage(len(prompt), choices.completion_tokens))


def _run_batched(engine: BatchingEngine, prompt: list[int], options: dict, choices: _Choices,
                 cancel: threading.Event) -> bool:
    """Submit to the batch and wait: True when it ended normally, False when the client left."""
    ended = threading.Event()
    failures: list[BaseException] = []

    def deliver(item: object) -> bool:
        if cancel.is_set():
            ended.set()
            return False
        if item is DONE:
            ended.set()
        elif isinstance(item, BaseException):
            failures.append(item)
            ended.set()
        else:
            choices.column(item[0])
        return True

    submitted = engine.submit(prompt, deliver, **options)
    while not ended.wait(0.05):  # a request still queued for rows sees no columns: poll the flag
        if cancel.is_set():
            submitted.cancelled = True
            return False
    if failures:
        raise failures[0]
    return not cancel.is_set()


class _Choices:
    """The streaming text of each choice: tokens in, Delta / Finish events out."""

    def __init__(self, engine, n: int, emit: Callable[[object], None]) -> None:
        self.stop_tokens, self.emit = engine.stop_tokens, emit
        self.streamers = [TextStreamer(engine.tokenizer) for _ in range(n)]
        self.done = [False] * n
        self.completion_tokens = 0

    def column(self, column: list[int | None]) -> None:
        for i, token in enumerate(column):
            if token is None or self.done[i]:
                continue
            self.completion_tokens += 1
            if token in self.stop_tokens:
                self.done[i] = True
                _emit_pieces(self.emit, i, self.streamers[i].finish())
                self.emit(Finish(i, "stop"))
            else:
                _emit_pieces(self.emit, i, self.streamers[i].push(token))

    def finish(self) -> None:
        """Close the choices that ran out of tokens (no stop token)."""
        for i, streamer in enumerate(self.streamers):
            if not self.done[i]:
                _emit_pieces(self.emit, i, streamer.finish())
                self.emit(Finish(i, "length"))


def _emit_pieces(emit: Callable[[object], None], index: int, pieces: list[Piece]) -> None:
    for piece in pieces:
        if piece.display or piece.text:
            emit(Delta(index, piece))
