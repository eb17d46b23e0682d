"""A bounded pool of engines, and one request's generation run in a worker thread.

Each worker is an Engine (one model replica per GPU; on CPU, N engines share one model, which is
read-only at inference). Where the engine supports continuous batching (a picochat GPT computing
in fp32 or bf16, on a CPU or a GPU), a worker is a BatchingEngine instead, handed out to `max_batch` requests at once that
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
from picochat.infer.streaming import Piece, RawTextStreamer, StopMatcher, TextStreamer
from picochat.serve.requests import Sampling


class PoolFull(Exception):
    """Every worker is busy and the queue is full."""


class WorkerPool:
    def __init__(self, engines: list[Engine], max_queue: int = 64):
        if not engines:
            raise ValueError("a worker pool needs at least one engine")
        self.engines, self.max_queue = engines, max_queue
        self.waiting = self.busy = 0
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
        batching = max_batch > 1 and BatchingEngine.supports(engine)
        handles += [BatchingEngine(engine, max_rows=max_batch)] * max_batch if batching else [engine]
    return WorkerPool(handles, max_queue=max_queue)


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely alternatives, (id, log-prob), best first


@dataclass
class Delta:
    index: int
    piece: Piece
    logprobs: list[TokenLogprob] | None = None  # the tokens this delta completes (when asked for)


@dataclass
class Finish:
    index: int
    reason: str  # "stop" | "length"


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def as_dict(self, dropped_messages: int | None = None) -> dict:
        dropped = {} if dropped_messages is None else {"dropped_messages": dropped_messages}
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens, **dropped}


@dataclass
class Failure:
    message: str  # the generation failed; the client gets a 500 / an error frame


END = object()  # the last event of a request


@dataclass
class Generation:
    """One prompt's generation: its choices are numbered from `first_index`."""

    prompt: list[int]
    sampling: Sampling
    first_index: int = 0
    use_tools: bool = True  # the calculator (chat); /v1/completions is the raw model
    raw_text: bool = False  # special tokens as their names instead of tool markup


def run_generation(engine: Engine | BatchingEngine, job: Generation, emit: Callable[[object], None],
                   cancel: threading.Event) -> None:
    """Generate every choice of `job`, emitting Delta / Finish events and a final Usage.

    A plain Engine generates in this (worker) thread. A BatchingEngine generates in its scheduler
    thread, which also turns each column into events here (`_Choices.column`), so a token reaches
    the event loop without a hop through this thread; this thread only waits for the end. A choice
    that completes a stop string ends there: the engine drops its row at the next step."""
    request = job.sampling
    choices = _Choices(engine, job, emit)
    options = {"num_samples": request.n, "max_tokens": request.max_tokens, "temperature": request.temperature,
               "top_k": request.top_k, "top_p": request.top_p, "seed": request.seed, "use_tools": job.use_tools,
               "logprobs": request.logprobs, "stopped": choices.stopped,
               "repetition_penalty": request.repetition_penalty}
    if isinstance(engine, BatchingEngine):
        if not _run_batched(engine, job.prompt, options, choices, cancel):
            return
    else:
        steps = engine.generate(job.prompt, **options)
        try:
            for column, _, *entries in steps:
                if cancel.is_set():
                    return
                choices.column(column, entries[0] if entries else None)
        finally:
            steps.close()  # frees the KV cache now, also when cancelled
    choices.finish()
    emit(Usage(len(job.prompt), choices.completion_tokens))


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
            choices.column(item[0], item[2] if len(item) == 3 else None)
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
    """The streaming text of each choice: tokens in, Delta / Finish events out (stop strings
    applied, log-probs attached to the delta that shows their token)."""

    def __init__(self, engine, job: Generation, emit: Callable[[object], None]) -> None:
        n = job.sampling.n
        self.stop_tokens, self.emit, self.base = engine.stop_tokens, emit, job.first_index
        # Raw completions list every generated token in their log-probs, the ending one too (a
        # harness takes the last entry as the generated token); chat leaves the end-of-turn out.
        self.raw = job.raw_text
        make = RawTextStreamer if job.raw_text else TextStreamer
        self.streamers = [make(engine.tokenizer) for _ in range(n)]
        self.matchers = [StopMatcher(job.sampling.stop) for _ in range(n)]
        self.pending: list[list[TokenLogprob]] = [[] for _ in range(n)]
        self.done = [False] * n
        self.stopped: set[int] = set()  # choices ended by a stop string (the engine reads this)
        self.completion_tokens = 0

    def column(self, column: list[int | None], entries: list | None = None) -> None:
        for i, token in enumerate(column):
            if token is None or self.done[i]:
                continue
            self.completion_tokens += 1
            stop_token = token in self.stop_tokens
            if entries is not None and entries[i] is not None and (self.raw or not stop_token):
                self.pending[i].append(TokenLogprob(token, *entries[i]))
            if stop_token:
                self._end(i, "stop")
                continue
            matcher = self.matchers[i]
            self._send(i, matcher.push(self.streamers[i].push(token)))
            if matcher.stopped:
                self.stopped.add(i)
                self._end(i, "stop")

    def finish(self) -> None:
        """Close the choices that ran out of tokens (no stop token)."""
        for i in range(len(self.streamers)):
            if not self.done[i]:
                self._end(i, "length")

    def _end(self, i: int, reason: str) -> None:
        self.done[i] = True
        matcher = self.matchers[i]
        pieces = matcher.push(self.streamers[i].finish())
        if matcher.stopped:  # the held-back text (a call's closing `>>`, a cut character) completed a stop string
            reason = "stop"
        self._send(i, pieces + matcher.finish(), last=True)
        self.emit(Finish(self.base + i, reason))

    def _send(self, i: int, pieces: list[Piece], last: bool = False) -> None:
        pieces = [p for p in pieces if p.display or p.text]
        if not pieces and last and self.pending[i]:
            pieces = [Piece("text", "", "")]  # carries the log-probs of tokens that showed nothing
        for piece in pieces:
            logprobs, self.pending[i] = self.pending[i], []
            self.emit(Delta(self.base + i, piece, logprobs or None))
