"""The inference engine: prefill once, decode with a static KV cache, sample, use the calculator.

    engine = Engine(model, tokenizer)
    for tokens, masks in engine.generate(prompt_ids, num_samples=4, max_tokens=256, temperature=0.8, seed=1):
        ...  # one column per step: tokens[i] is sample i's new token (None once it finished)

How a request runs:
1. The prompt is prefilled once into a batch-1 cache sized for prompt + max_tokens; the cache is
   copied to `num_samples` rows (KVCache.expand), so n samples cost one prefill.
2. Each step samples one token per live row (temperature / top-k / top-p, drawn from the
   request's own seeded torch.Generator), yields the column, and feeds the column back.
3. Tool use: a row that writes `<|python_start|> expr <|python_end|>` gets the
   calculator's answer forced in as `<|output_start|> result <|output_end|>`, one token per step
   (so all rows stay at the same cache position); forced tokens have mask 0, sampled ones 1.
4. A row finishes on `<|assistant_end|>` or `<|bos|>` (the token is yielded, then None), or at
   max_tokens. Finished rows are dropped from the batch and the cache, so they cost nothing.

A picochat GPT computes with its weights held in the compute dtype (bf16 on CUDA and on CPUs
with fast bf16, else fp32; PICOCHAT_DTYPE or --dtype choose), so no matmul casts a weight per
token: serving casts the model once at load (GPT.cast_weights_), and a model that keeps
training between generations (RL) gets a compute-dtype copy per generation
(GPT.with_weights_in). Autocast then only rounds activations into the matmuls.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from picochat.errors import UserError
from picochat.infer.calculator import calculator
from picochat.infer.decode import DecodeStep
from picochat.infer.sampling import logprob_entries, sample_next, token_logprobs
from picochat.infer.unembed import Unembedder
from picochat.model.gpt import GPT
from picochat.model.kv_cache import KVCache
from picochat.runtime import pick_dtype

# A CPU prefill in bf16 runs oneDNN GEMMs, which build (JIT-compile) and cache a kernel per new
# shape: prompts of every length grew a server's memory without bound (~300 MB over 200 mixed
# requests). Prefills are padded to a multiple of this many tokens, so a few shapes serve all.
PREFILL_BUCKET = 64
REPEAT_WINDOW = 64  # generated tokens a repetition penalty looks back over


@dataclass
class RowState:
    """Decode state of one sample."""

    index: int  # position in the yielded column
    forced: deque = field(default_factory=deque)  # tool output tokens still to feed
    in_python: bool = False
    python_tokens: list[int] = field(default_factory=list)
    recent: deque = field(default_factory=lambda: deque(maxlen=REPEAT_WINDOW))  # read by repetition_penalty


class Engine:
    def __init__(self, model: torch.nn.Module, tokenizer, compute_dtype: torch.dtype | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.device = next(model.parameters()).device
        # bf16 autocast on CUDA and on CPUs with AMX/AVX512-BF16; fp32 elsewhere, where bf16 is slower.
        self.compute_dtype = compute_dtype or pick_dtype(self.device)
        sp = tokenizer.encode_special
        self.python_start, self.python_end = sp("python_start"), sp("python_end")
        self.output_start, self.output_end = sp("output_start"), sp("output_end")
        self.stop_tokens = {sp("assistant_end"), tokenizer.bos_id}
        # A picochat GPT: logits come raw from _last_logits and the sampler applies this softcap.
        self.softcap = model.config.softcap if isinstance(model, GPT) else None
        self.lean_decode = DecodeStep.supports(model, self.compute_dtype)
        # The lean path keeps keys and values in fp32 (bf16 values, exactly): see DecodeStep.
        self.cache_dtype = torch.float32 if self.lean_decode else self.compute_dtype

    def inference_model(self) -> torch.nn.Module:
        """The model with its weights in the compute dtype: the model itself when they already are
        (cast at load), else a copy for one generation (the weights may change between them)."""
        return self.model.with_weights_in(self.compute_dtype) if isinstance(self.model, GPT) else self.model

    @property
    def context_len(self) -> int:
        return self.config.sequence_len

    def autocast(self):
        return (contextlib.nullcontext() if self.compute_dtype == torch.float32
                else torch.autocast(self.device.type, dtype=self.compute_dtype))

    def fit_prompt(self, tokens: list[int], max_tokens: int | None) -> tuple[list[int], int]:
        """Clip a prompt to the context (keeping its first token, <|bos|>, and its newest tokens)
        and max_tokens to what is left. Conversations should be fitted turn by turn first
        (picochat.infer.prompt.fit_conversation); this is the last guard, so nothing ever overflows."""
        room = self.context_len - 1  # leave space for at least one new token
        if len(tokens) > room:
            tokens = tokens[:1] + tokens[len(tokens) - room + 1:]
        left = self.context_len - len(tokens)
        return tokens, left if max_tokens is None else max(1, min(max_tokens, left))

    @torch.inference_mode()
    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = 42, use_tools: bool = True, logprobs: int | None = None,
                 stopped: set[int] | None = None, repetition_penalty: float | None = None,
                 ) -> Iterator[tuple[list[int | None], list[int]]]:
        """Yield, per step, (tokens, masks): one entry per sample; None/0 for finished samples.

        `logprobs` (opt-in, the number of alternatives 0-20): each step yields (tokens, masks,
        entries) instead, entries[i] = (log-prob of tokens[i], [(id, log-prob)] of the `logprobs`
        most likely) at temperature 1 (sampling.token_logprobs), or None for a finished sample.
        `stopped`: sample indices the caller adds to while iterating (e.g. a stop string matched);
        those samples end at the next step and leave the batch.
        `repetition_penalty` (opt-in, e.g. 1.2): each sample's last REPEAT_WINDOW generated tokens
        are made less likely (sampling.penalize_repeats)."""
        tokens = self.check_prompt(tokens)
        if num_samples < 1:
            raise UserError(f"num_samples must be >= 1, got {num_samples}")
        tokens, max_tokens = self.fit_prompt(tokens, max_tokens)
        sample = self.sampling(seed, temperature, top_k, top_p)

        cfg = self.config
        head_dim = cfg.n_embd // cfg.n_head
        max_len = max(len(tokens) + max_tokens, self.prefill_len(len(tokens)))
        cache = KVCache(1, cfg.n_layer, cfg.n_kv_head, head_dim, max_len, self.device, self.cache_dtype)
        prompt = torch.tensor([tokens], dtype=torch.long, device=self.device)
        # Per-generation helpers (they may copy weights, which must not change meanwhile).
        model = self.inference_model()
        unembed = Unembedder(model.lm_head.weight, self.compute_dtype) if self.softcap is not None else None
        decode: DecodeStep | None = None
        logits = (self._last_logits(model, prompt, cache, unembed) if unembed is None
                  else unembed(self.prefill(model, prompt, cache)))  # (1, vocab)
        if num_samples > 1:
            cache = cache.expand(num_samples)
            logits = logits.expand(num_samples, -1)

        rows = [RowState(i) for i in range(num_samples)]
        for step in range(max_tokens):
            recent = recent_ids(rows, self.device) if repetition_penalty else None  # (live rows, W)
            sampled = sample_next(logits, **sample, recent=recent, repetition_penalty=repetition_penalty).tolist()
            column, masks, finished = self.next_column(rows, sampled, num_samples, use_tools, stopped)
            yield (column, masks) if logprobs is None else (
                column, masks, logprob_column(rows, column, logits, self.softcap, logprobs, num_samples))
            live = [r for r in range(len(rows)) if r not in finished]
            if step == max_tokens - 1 or not live:
                break
            if finished:
                cache.keep_rows(torch.tensor(live, device=self.device))
                rows = [rows[r] for r in live]
            ids = torch.tensor([[column[row.index]] for row in rows], dtype=torch.long, device=self.device)  # (B, 1)
            if decode is None and self.lean_decode:
                decode = DecodeStep(model)
            logits = self._last_logits(model, ids, cache, unembed, decode)  # (B, vocab)

    def sampling(self, seed: int | None, temperature: float, top_k: int | None, top_p: float | None) -> dict:
        """sample_next's keyword arguments for one request, with its own generator (seeded with
        `seed`, or from the OS when None)."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        return {"generator": generator, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                "softcap": self.softcap}

    def next_column(self, rows: list[RowState], sampled: list[int], num_samples: int,
                     use_tools: bool, stopped: set[int] | None = None) -> tuple[list[int | None], list[int], list[int]]:
        """One step of a request: a token per live row (the one sampled for it, or forced tool
        output), as (column, masks, indices into `rows` of the rows that just finished), each
        also added to its row's recent tokens. A row whose index is in `stopped` gets no token
        and finishes."""
        column: list[int | None] = [None] * num_samples
        masks = [0] * num_samples
        finished: list[int] = []
        for r, row in enumerate(rows):
            if stopped and row.index in stopped:
                finished.append(r)
                continue
            if row.forced:
                token = row.forced.popleft()
            else:
                token, masks[row.index] = sampled[r], 1
            column[row.index] = token
            row.recent.append(token)
            if use_tools:
                self._track_tool(row, token)
            if token in self.stop_tokens:  # tool output never contains special tokens
                finished.append(r)
        return column, masks, finished

    def prefill_len(self, length: int) -> int:
        """How many positions the prefill of a `length`-token prompt computes (PREFILL_BUCKET)."""
        if self.device.type != "cpu" or self.compute_dtype == torch.float32:
            return length
        return -(-length // PREFILL_BUCKET) * PREFILL_BUCKET

    def prefill(self, model: torch.nn.Module, prompt: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run a (1, T) prompt through a picochat GPT into `cache` (room for prefill_len(T)); return
        the final hidden state of its last token (1, C). Padding tokens after the prompt change
        nothing before them (causal attention); their keys and values lie past cache.pos, where
        decoding overwrites them before anything attends to them."""
        length = prompt.size(1)
        padded = self.prefill_len(length)
        if padded > length:
            prompt = torch.cat([prompt, prompt.new_zeros(1, padded - length)], dim=1)
        start = cache.pos
        with self.autocast():
            hidden = model.hidden_states(prompt, kv_cache=cache)[:, length - 1, :]
        cache.pos = start + length
        return hidden

    def _last_logits(self, model: torch.nn.Module, ids: torch.Tensor, cache: KVCache, unembed: Unembedder | None,
                     decode: DecodeStep | None = None) -> torch.Tensor:
        """Logits of the last position of every row, as `sample_next` takes them (see self.softcap).

        A picochat GPT unembeds only that position, in the layout fastest for the batch size,
        and leaves the (monotonic) softcap to the sampler; one-token steps go through the
        leaner DecodeStep where it is faster. Any other model goes through forward.
        """
        with self.autocast():
            if unembed is None:
                return model(ids, kv_cache=cache)[:, -1, :]
            if decode is not None and ids.size(1) == 1:
                return unembed(decode(ids, cache))  # (B, C) -> (B, vocab)
            return unembed(model.hidden_states(ids, kv_cache=cache)[:, -1, :])

    def generate_batch(self, tokens: list[int], num_samples: int = 1, keep_stop: bool = False,
                       **kwargs) -> tuple[list[list[int]], list[list[int]]]:
        """All samples at once: (token lists, mask lists), without the final stop token unless
        `keep_stop` (RL trains on ending the answer: the stop token is a sampled action)."""
        results: list[list[int]] = [[] for _ in range(num_samples)]
        masks: list[list[int]] = [[] for _ in range(num_samples)]
        for column, column_masks in self.generate(tokens, num_samples=num_samples, **kwargs):
            for i, token in enumerate(column):
                if token is not None and (keep_stop or token not in self.stop_tokens):
                    results[i].append(token)
                    masks[i].append(column_masks[i])
        return results, masks

    def _track_tool(self, row: RowState, token: int) -> None:
        """The calculator state machine: collect the expression, force its result after <|python_end|>."""
        if token == self.python_start:
            row.in_python, row.python_tokens = True, []
        elif token == self.python_end and row.in_python:
            row.in_python = False
            result = calculator(self.tokenizer.decode(row.python_tokens))
            if result is not None:
                row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
        elif row.in_python:
            row.python_tokens.append(token)

    @torch.inference_mode()
    def score(self, tokens: list[int], top: int = 0) -> list[tuple[float, list[tuple[int, float]]] | None]:
        """Log-prob of every prompt token given the ones before it (None for the first), with the
        `top` most likely alternatives at each position: one forward pass over the whole prompt."""
        tokens = self.check_prompt(tokens)
        if len(tokens) > self.context_len:
            raise UserError(f"the prompt has {len(tokens)} tokens; the context holds {self.context_len}")
        if len(tokens) == 1:
            return [None]
        padded = tokens + [0] * (self.prefill_len(len(tokens)) - len(tokens))  # causal: the padding changes nothing
        ids = torch.tensor([padded], dtype=torch.long, device=self.device)
        with self.autocast():
            logits = self.inference_model()(ids)[0, :len(tokens) - 1]  # (T-1, vocab), softcapped by forward
        return [None, *logprob_entries(token_logprobs(logits), tokens[1:], top)]

    def check_prompt(self, tokens) -> list[int]:
        if not isinstance(tokens, (list, tuple)) or not tokens:
            raise UserError("the prompt must be a non-empty list of token ids")
        vocab = self.config.vocab_size
        bad = next((t for t in tokens if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise UserError(f"prompt token {bad!r} is not an id in [0, {vocab})")
        return list(tokens)


def logprob_column(rows: list[RowState], column: list[int | None], logits: torch.Tensor, softcap: float | None,
                   top: int, num_samples: int) -> list[tuple[float, list[tuple[int, float]]] | None]:
    """The log-prob entries of one step's column: `logits` has one row per entry of `rows`
    (the live rows, as sampled), a row that got no token (stopped) gets None."""
    entries: list = [None] * num_samples
    given = [r for r, row in enumerate(rows) if column[row.index] is not None]
    if given:
        picked = logits.index_select(0, torch.tensor(given, device=logits.device)) if len(given) < len(rows) else logits
        tokens = [column[rows[r].index] for r in given]
        for r, entry in zip(given, logprob_entries(token_logprobs(picked, softcap), tokens, top), strict=True):
            entries[rows[r].index] = entry
    return entries


def recent_ids(rows: list[RowState], device: torch.device) -> torch.Tensor:
    """(rows, REPEAT_WINDOW) int64 of each row's recent tokens, -1 where it has fewer."""
    out = torch.full((len(rows), REPEAT_WINDOW), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        if row.recent:
            out[r, : len(row.recent)] = torch.tensor(list(row.recent))
    return out.to(device)
