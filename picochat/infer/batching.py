"""Continuous batching: concurrent requests share one decode step, each at its own position.

    batcher = BatchingEngine(engine, max_rows=8)     # one per model replica
    for tokens, masks in batcher.generate(prompt_ids, max_tokens=256, seed=1):  # from any thread
        ...  # exactly what engine.generate yields for this request

With one Engine per request (picochat serve without batching), 8 clients on a CPU each get a
batch-1 decode: ~8x the weight traffic of one batch-8 step for the same tokens. Here a single
scheduler thread owns the model and a KV cache of `max_rows` rows. Each iteration it
1. admits waiting requests while rows are free (a request of n samples needs n rows): the prompt
   is prefilled at batch 1, and its keys and values are copied into the request's rows;
2. samples the next token of every request from its rows' logits with the request's own seeded
   generator and settings, applies tool forcing (the calculator, as in engine.py), and hands the column to the
   request's consumer;
3. frees the rows of finished or abandoned requests (the last rows move into the gaps, so the
   live rows stay 0..B-1 and the cache's first B rows are the batch);
4. runs one DecodeStep over all live rows, each at its own position (per-row rotary offsets and
   attention masks), and unembeds them together.

Sampling draws from the same logits with the same generator in the same order as
Engine.generate, so a request's tokens do not depend on what else is in the batch (up to float
summation order in attention over a longer masked span); tests/infer/test_batching.py checks
greedy and seeded outputs against Engine.generate, in fp32 and bf16. In bf16 that needs the
small-batch C kernel, whose rows are summed independently of the batch: torch's GEMMs (the
fallback where no C compiler is found) sum a row in an order that depends on the batch's size,
and rounding to bf16 can turn that into another token.

This needs a picochat GPT computing in fp32 or bf16 (DecodeStep.runs), on any device. Where the
engine decodes through DecodeStep's weight copies (a small model on the CPU) so does the batch;
elsewhere (a GPU, or blocks over DecodeStep's copy limit: d12 and up in fp32) the step reads the
model's own weights through F.linear, and one step for B requests still reads them once instead
of B times. There, in bf16, torch's GEMMs may round a row differently with the batch's size, so
a batched request can in rare near-ties draw another token than alone (fp32 stays exact; the
tests check both paths in fp32 and the copies in bf16). Any other model or dtype
(`BatchingEngine.supports` False) is served with one Engine per request. The KV cache (max_rows
x the context, fp32 as DecodeStep keeps it: e.g. 3.4 GB for d20 at 8 rows and 2,048 positions),
the model in the compute dtype (Engine.inference_model: the served model itself, cast at load)
and any weight copies are made for the first request and kept until close(), so the model's
weights must not change while a BatchingEngine is in use (serving never trains).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from picochat.errors import UserError
from picochat.infer.decode import DecodeStep
from picochat.infer.engine import Engine, RowState, logprob_column, recent_ids
from picochat.infer.sampling import sample_many
from picochat.infer.unembed import Unembedder
from picochat.model.kv_cache import KVCache

CACHE_DTYPE = torch.float32  # DecodeStep's keys and values (bf16 values, exactly)
DONE = object()  # the last item a request's `deliver` gets after a normal end


@dataclass
class _Request:
    prompt: list[int]
    num_samples: int
    max_tokens: int
    sample: dict  # sample_next keyword arguments, with the request's generator
    use_tools: bool
    # called in the scheduler thread with each (column, masks), then with DONE or an exception;
    # returning False abandons the request
    deliver: Callable[[object], bool | None]
    rows: list[RowState] = field(default_factory=list)  # live rows, in sampling order
    logits: torch.Tensor | None = None  # (live rows, vocab) for the next sample
    steps: int = 0
    cancelled: bool = False
    logprobs: int | None = None  # opt-in: columns carry log-prob entries (Engine.generate's `logprobs`)
    stopped: set[int] | None = None  # sample indices the consumer ended (Engine.generate's `stopped`)
    repetition_penalty: float | None = None  # Engine.generate's

    def sampling(self, device: torch.device) -> dict:
        """sample_many's settings for this request's rows: with a penalty, also their recent tokens."""
        if not self.repetition_penalty:
            return self.sample
        return {**self.sample, "recent": recent_ids(self.rows, device), "repetition_penalty": self.repetition_penalty}


class _Decoder:
    """What the scheduler decodes with, made for the first request and kept until close()."""

    def __init__(self, engine: Engine, max_rows: int) -> None:
        cfg = engine.config
        self.model = engine.inference_model()  # in the compute dtype (the served model itself)
        self.cache = KVCache(max_rows, cfg.n_layer, cfg.n_kv_head, cfg.head_dim, engine.context_len,
                             engine.device, CACHE_DTYPE)  # max_rows x the context
        self.decode = DecodeStep(self.model)
        self.unembed = Unembedder(self.model.lm_head.weight, engine.compute_dtype)


@dataclass
class _Slot:
    """One cache row: whose sample it is and how many positions it holds."""

    request: _Request
    row: RowState
    length: int
    last_token: int = 0


class BatchingEngine:
    """Engine.generate's interface over one shared, continuously batched decode loop."""

    def __init__(self, engine: Engine, max_rows: int = 8) -> None:
        if not self.supports(engine):
            raise ValueError("continuous batching needs a picochat GPT computing in fp32 or bf16")
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.engine, self.max_rows = engine, max_rows
        self.tokenizer, self.stop_tokens = engine.tokenizer, engine.stop_tokens
        self._cond = threading.Condition()
        self._waiting: list[_Request] = []
        self._slots: list[_Slot] = []  # live cache rows 0 .. len-1 (only the scheduler touches these)
        self._thread: threading.Thread | None = None
        self._closed = False

    @staticmethod
    def supports(engine: Engine) -> bool:
        return DecodeStep.runs(engine.model, engine.compute_dtype) and engine.softcap is not None

    @property
    def context_len(self) -> int:
        return self.engine.context_len

    def generate(self, tokens: list[int], **options: Any) -> Iterator[tuple[list[int | None], list[int]]]:
        """As Engine.generate, whose keyword arguments `submit` takes (nothing is queued before the
        first next()); closing the iterator early frees the request's rows at the next step."""
        columns: queue.SimpleQueue = queue.SimpleQueue()
        request = self.submit(tokens, columns.put, **options)
        try:
            for item in iter(columns.get, DONE):
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.cancelled = True

    def submit(self, tokens: list[int], deliver: Callable[[object], bool | None], num_samples: int = 1,
               max_tokens: int | None = None, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = 42, use_tools: bool = True,
               logprobs: int | None = None, stopped: set[int] | None = None,
               repetition_penalty: float | None = None) -> _Request:
        """Queue a request whose columns go to `deliver(item)`, called in the scheduler thread:
        each (tokens, masks) as Engine.generate yields them, then `DONE`, or an exception if the
        generation failed. `deliver` returning False abandons the request (its rows are freed)."""
        engine = self.engine
        tokens = engine.check_prompt(tokens)
        if not 1 <= num_samples <= self.max_rows:
            raise UserError(f"num_samples must be in [1, {self.max_rows}] (the batch's rows), got {num_samples}")
        tokens, max_tokens = engine.fit_prompt(tokens, max_tokens)
        request = _Request(tokens, num_samples, max_tokens, engine.sampling(seed, temperature, top_k, top_p),
                           use_tools, deliver, logprobs=logprobs, stopped=stopped,
                           repetition_penalty=repetition_penalty)
        with self._cond:
            if self._closed:
                raise RuntimeError("this BatchingEngine is closed")
            self._waiting.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="picochat-batch", daemon=True)
                self._thread.start()
            self._cond.notify()
        return request

    def close(self, timeout: float = 10.0) -> None:
        """Stop the scheduler thread after its current step and wait for it (requests still
        running get an error), so no decode step is left running while the process exits."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # ---- the scheduler thread ----

    def _run(self) -> None:
        decoder: _Decoder | None = None
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._slots:
                    self._cond.wait()
                if self._closed:
                    decoder = None
                    failure = RuntimeError("the server is shutting down")
                    for request in self._in_batch(*self._waiting):
                        self._hand(request, failure)
                    return
                admit = self._take_admissible()
            try:
                with torch.inference_mode(), self.engine.autocast():
                    decoder = decoder or _Decoder(self.engine, self.max_rows)
                    self._iterate(admit, decoder)
            except Exception as e:  # noqa: BLE001 - fail the requests in flight, keep serving
                for request in self._in_batch(*admit):
                    self._hand(request, e)
                self._slots.clear()
                decoder = None

    def _in_batch(self, *more: _Request) -> list[_Request]:
        """The requests with live rows, each once in row order, then those of `more` not among them."""
        return list({id(r): r for r in [*(s.request for s in self._slots), *more]}.values())

    def _take_admissible(self) -> list[_Request]:
        """Waiting requests (oldest first) that fit the free rows; called under the lock."""
        self._waiting = [r for r in self._waiting if not r.cancelled]
        free = self.max_rows - len(self._slots)
        admit = []
        while self._waiting and self._waiting[0].num_samples <= free:
            admit.append(self._waiting.pop(0))
            free -= admit[-1].num_samples
        return admit

    def _iterate(self, admit: list[_Request], decoder: _Decoder) -> None:
        engine, cache = self.engine, decoder.cache
        for request in admit:
            self._prefill(decoder, request)

        # Sample every request's next token, from its rows' logits, as Engine.generate does.
        in_batch = self._in_batch()
        requests = [r for r in in_batch if not r.cancelled]
        slot_of = {id(s.row): s for s in self._slots}
        # ids of the RowState objects that are done: those of abandoned requests, and those that end below
        finished_rows = {id(row) for r in in_batch if r.cancelled for row in r.rows}
        drawn = sample_many(torch.cat([r.logits for r in requests]),
                            [(len(r.rows), r.sampling(engine.device)) for r in requests]) if requests else []
        start = 0
        for request in requests:
            sampled, start = drawn[start:start + len(request.rows)], start + len(request.rows)
            column, masks, finished = engine.next_column(request.rows, sampled, request.num_samples,
                                                          request.use_tools, request.stopped)
            item = (column, masks)
            if request.logprobs is not None:
                item += (logprob_column(request.rows, column, request.logits, engine.softcap, request.logprobs,
                                        request.num_samples),)
            live = [row for r, row in enumerate(request.rows) if r not in finished]
            finished_rows.update(id(request.rows[r]) for r in finished)
            for row in live:
                slot_of[id(row)].last_token = column[row.index]
            request.steps += 1
            handed = self._hand(request, item)
            if not handed or request.steps == request.max_tokens or not live:
                finished_rows.update(id(row) for row in live)
                live = []
                if handed:
                    self._hand(request, DONE)
            request.rows = live
        self._free(finished_rows, cache)
        if not self._slots:
            return

        # One decode step for every live row, each at its own position.
        ids = torch.tensor([[s.last_token] for s in self._slots], dtype=torch.long, device=engine.device)
        positions = torch.tensor([s.length for s in self._slots], dtype=torch.long, device=engine.device)
        logits = decoder.unembed(decoder.decode(ids, cache, positions))  # (B, vocab)
        for s in self._slots:
            s.length += 1
        # Each request's rows back to back, in its sampling order: one gather, then views.
        index = {id(s.row): b for b, s in enumerate(self._slots)}
        live = [r for r in requests if r.rows]
        order = torch.tensor([index[id(row)] for r in live for row in r.rows], device=engine.device)
        for request, part in zip(live, logits.index_select(0, order).split([len(r.rows) for r in live])):
            request.logits = part

    @staticmethod
    def _hand(request: _Request, item: object) -> bool:
        """Give `item` to the request's consumer; False if the request is (now) abandoned."""
        if request.cancelled:
            return False
        try:
            keep = request.deliver(item)
        except Exception:  # noqa: BLE001 - a failing consumer abandons its own request only
            keep = False
        if keep is False:
            request.cancelled = True
        return not request.cancelled

    def _prefill(self, decoder: _Decoder, request: _Request) -> None:
        engine, cache, cfg = self.engine, decoder.cache, self.engine.config
        solo = KVCache(1, cfg.n_layer, cfg.n_kv_head, cfg.head_dim, engine.prefill_len(len(request.prompt)),
                       engine.device, CACHE_DTYPE)
        prompt = torch.tensor([request.prompt], dtype=torch.long, device=engine.device)
        logits = decoder.unembed(engine.prefill(decoder.model, prompt, solo))  # (1, vocab)
        length, first = len(request.prompt), len(self._slots)
        request.rows = [RowState(i) for i in range(request.num_samples)]
        self._slots += [_Slot(request, row, length) for row in request.rows]
        cache.copy_rows(slice(first, first + request.num_samples), solo, slice(0, 1), length)
        request.logits = logits.expand(request.num_samples, -1)

    def _free(self, finished_rows: set[int], cache: KVCache) -> None:
        """Drop finished rows; the last live rows move into the gaps (their keys and values too)."""
        b = 0
        while b < len(self._slots):
            if id(self._slots[b].row) not in finished_rows:
                b += 1
                continue
            moved = self._slots.pop()  # the last row: into the gap, unless it was the gap
            if b < len(self._slots):
                cache.copy_rows(b, cache, len(self._slots), moved.length)
                self._slots[b] = moved
