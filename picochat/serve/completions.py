"""POST /v1/completions: the raw model, in OpenAI's legacy text-completion shape.

    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}'

- `prompt`: a string, a list of strings, token ids, or a list of token-id lists; choice
  `p * n + j` is prompt p's j-th sample. A string may name special tokens (`<|bos|>`) and gets
  `<|bos|>` in front unless it starts with one (every training document did); that added token
  conditions the model but is not echoed; "" is that `<|bos|>` alone (the model writes a new
  document). Token ids are used exactly as given.
- `best_of` is accepted only equal to n (n candidates, all of them returned).
- No chat template and no calculator: the text is what the model writes, special tokens shown
  by name; a generated `<|bos|>` (a new document) or `<|assistant_end|>` ends the choice.
- `echo` puts the prompt in front of the text; `max_tokens: 0` with `echo` scores the prompt only.
- `logprobs: k` (0-20) returns `tokens`, `token_logprobs` (log-softmax of the softcapped logits at
  temperature 1; None for a first token that has nothing before it), `top_logprobs` (the k most
  likely, token -> log-prob) and `text_offset` (each token's character offset in `text`), for the
  echoed prompt too. This is what lm-evaluation-harness's `local-completions` model reads.
"""

from __future__ import annotations

import asyncio
import codecs
import json
from dataclasses import dataclass

from picochat.infer.prompt import encode_raw_prompt
from picochat.serve.pool import END, Delta, Failure, Finish, TokenLogprob, Usage
from picochat.serve.requests import APIError, CompletionRequest


@dataclass
class PreparedPrompt:
    ids: list[int]  # what the model sees
    echo_from: int  # ids[echo_from:] are the client's own prompt tokens (what echo returns)
    scores: list | None = None  # Engine.score entries of the echoed tokens

    def score(self, engine, top: int | None) -> None:
        """Log-probs of the echoed tokens (only when the request asks for logprobs)."""
        if top is not None:
            self.scores = engine.score(self.ids, top)[self.echo_from:]


def prepare_completion(tokenizer, context_len: int, req: CompletionRequest) -> list[PreparedPrompt]:
    """Each prompt as token ids, checked against the vocabulary and the context."""
    prompts = []
    vocab, bos = tokenizer.vocab_size, tokenizer.bos_id
    for i, raw in enumerate(req.prompts):
        param = f"prompt.{i}" if len(req.prompts) > 1 else "prompt"
        if isinstance(raw, str):
            ids = encode_raw_prompt(tokenizer, raw)
            prompt = PreparedPrompt(ids, 0) if ids and ids[0] == bos else PreparedPrompt([bos, *ids], 1)
        else:
            if (bad := next((t for t in raw if not 0 <= t < vocab), None)) is not None:
                raise APIError(400, f"prompt token {bad} is not an id in [0, {vocab})", param)
            prompt = PreparedPrompt(list(raw), 0)
        if len(prompt.ids) + req.max_tokens > context_len:
            raise APIError(400, f"prompt {i} has {len(prompt.ids)} tokens and max_tokens is {req.max_tokens}; the "
                           f"model's context holds {context_len}: shorten the prompt or lower max_tokens", param,
                           "context_length_exceeded")
        prompts.append(prompt)
    return prompts


class _Choice:
    """One choice being assembled: its text, its log-probs (OpenAI's legacy logprobs object), its end."""

    def __init__(self, tokenizer, req: CompletionRequest, prompt: PreparedPrompt):
        self.tokenizer, self.req, self.prompt = tokenizer, req, prompt
        # the character offset of the next token in the text, decoding as the text was decoded
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.offset = 0
        self.text, self.logprobs, self.reason = "", None, None

    def echo(self) -> tuple[str, dict | None]:
        ids = self.prompt.ids[self.prompt.echo_from:]
        return self._add(self.tokenizer.decode(ids), ids, self.prompt.scores or [None] * len(ids))

    def delta(self, event: Delta) -> tuple[str, dict | None]:
        tokens: list[TokenLogprob] = event.logprobs or []
        return self._add(event.piece.display, [t.token for t in tokens], [(t.logprob, t.top) for t in tokens])

    def _add(self, text: str, tokens: list[int], entries: list) -> tuple[str, dict | None]:
        """Append `text`, and the log-probs block of `tokens` (entries: (logprob, top) or None) when
        the request asks for log-probs; returns both."""
        self.text += text
        if self.req.logprobs is None:
            return text, None
        block: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, entry in zip(tokens, entries, strict=True):
            block["tokens"].append(self.tokenizer.id_to_text(token))
            block["text_offset"].append(self.offset)
            self.offset += len(self.decoder.decode(self.tokenizer.decode_bytes([token])))
            if entry is None:
                block["token_logprobs"].append(None)
                block["top_logprobs"].append(None)
                continue
            logprob, top = entry
            block["token_logprobs"].append(logprob)
            alternatives: dict[str, float] = {}
            for t, lp in top:
                alternatives.setdefault(self.tokenizer.id_to_text(t), lp)
            block["top_logprobs"].append(alternatives)
        self.logprobs = self.logprobs or {key: [] for key in block}
        for key, values in block.items():
            self.logprobs[key] += values
        return text, block


class _Choices:
    """Every choice of a request (choice p * n + j is prompt p's j-th sample) and the usage so far."""

    def __init__(self, tokenizer, req: CompletionRequest, prompts: list[PreparedPrompt]):
        self.all = [_Choice(tokenizer, req, prompt) for prompt in prompts for _ in range(req.n)]
        self.echoed = not req.echo
        self.usage = Usage(0, 0)

    def update(self, event) -> list[tuple[int, str, dict | None, str | None]]:
        """Apply an event (not a Failure); returns what it adds to the choices as (index, text, logprobs,
        finish reason), the echo of every choice first (the prompts were scored before the first event)."""
        added = []
        if not self.echoed:
            self.echoed = True
            added = [(c, *choice.echo(), None) for c, choice in enumerate(self.all)]
        if isinstance(event, Delta):
            added.append((event.index, *self.all[event.index].delta(event), None))
        elif isinstance(event, Finish):
            self.all[event.index].reason = event.reason
            added.append((event.index, "", None, event.reason))
        elif isinstance(event, Usage):
            self.usage.prompt_tokens += event.prompt_tokens
            self.usage.completion_tokens += event.completion_tokens
        return added


async def completion_response(req: CompletionRequest, prompts: list[PreparedPrompt], header: dict,
                              events: asyncio.Queue, on_close, tokenizer) -> dict:
    choices = _Choices(tokenizer, req, prompts)
    finished = False
    try:
        while (event := await events.get()) is not END:
            if isinstance(event, Failure):
                raise APIError(500, event.message, type_="server_error")
            choices.update(event)
        finished = True
    finally:
        on_close(finished)
    body = [{"index": c, "text": choice.text, "logprobs": choice.logprobs, "finish_reason": choice.reason}
            for c, choice in enumerate(choices.all)]
    return {**header, "object": "text_completion", "choices": body, "usage": choices.usage.as_dict()}


async def completion_sse(req: CompletionRequest, prompts: list[PreparedPrompt], header: dict, events: asyncio.Queue,
                         on_close, tokenizer):
    """text_completion frames: the echo (if asked), text deltas, a finish frame per choice, the
    usage frame if asked for, then [DONE]."""
    def frame(index: int | None, text: str = "", logprobs: dict | None = None, reason: str | None = None,
              usage: dict | None = None) -> str:
        choices = [] if index is None else [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}]
        obj = {**header, "object": "text_completion", "choices": choices}
        if req.include_usage:
            obj["usage"] = usage
        return f"data: {json.dumps(obj)}\n\n"

    choices = _Choices(tokenizer, req, prompts)
    finished = False
    try:
        while (event := await events.get()) is not END:
            if isinstance(event, Failure):
                yield f"data: {json.dumps(APIError(500, event.message, type_='server_error').body())}\n\n"
            else:
                for added in choices.update(event):
                    yield frame(*added)
        if req.include_usage:
            yield frame(None, usage=choices.usage.as_dict())
        yield "data: [DONE]\n\n"
        finished = True
    finally:
        on_close(finished)
