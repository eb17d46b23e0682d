"""Next-token sampling from logits: greedy, temperature, top-k and top-p (nucleus), seeded."""

from __future__ import annotations

import math

import torch

from picochat.infer import cpu_matmul
from picochat.model.gpt import softcap_logits

# Below this temperature a draw is greedy: dividing logits by, say, 1e-40 overflows to inf and the
# softmax to NaN, and at 1e-5 a logit gap of 1e-4 already makes odds of e**-10, which is greedy anyway.
GREEDY_BELOW = 1e-5


def is_greedy(temperature: float) -> bool:
    """Whether `temperature` draws the argmax (0, and any temperature below GREEDY_BELOW)."""
    return temperature < GREEDY_BELOW


def sample_next(
    logits: torch.Tensor,
    generator: torch.Generator | None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    softcap: float | None = None,
    recent: torch.Tensor | None = None,
    repetition_penalty: float | None = None,
) -> torch.Tensor:
    """One token per row from `logits` (B, vocab) -> (B,) int64.

    temperature 0 (or below GREEDY_BELOW) is greedy (argmax). top_k keeps the k most likely tokens, top_p the smallest
    set whose probability mass reaches p; both apply before the temperature-scaled draw.
    All randomness comes from `generator`, so a seeded generator makes the draw reproducible.

    `softcap`: the logits are raw and the model's softcap (cap * tanh(x / cap)) is still to be
    applied. It is monotonic, so greedy and top-k pick on the raw logits and cap only the k
    kept values: the same draw as capping everything first, without two passes over the vocab.
    (Only beyond ~9x the cap, where fp32 tanh rounds to exactly 1, would capping first make ties
    that the raw logits break.)

    `repetition_penalty` (> 1 discourages): with `recent` (B, W) token ids per row (-1 for empty
    slots), each id in a row's `recent` has its softcapped logit divided by the penalty when positive
    and multiplied by it when negative (see penalize_repeats), before greedy or sampling.
    """
    penalized = repetition_penalty is not None and repetition_penalty != 1.0 and recent is not None and recent.numel()
    top = candidates_needed(temperature, top_k, logits.size(-1))
    if penalized and (top is None or repetition_penalty < 1.0):  # the whole vocabulary
        logits, softcap, penalized = penalize_repeats(capped(logits.float(), softcap), recent, repetition_penalty), None, False
    if is_greedy(temperature) and not penalized:
        return logits.argmax(dim=-1)
    nucleus = top_p is not None and top_p < 1.0
    if top is not None:
        # Work on the k best only: a (B, k) softmax instead of (B, vocab) is most of the speed.
        logits, ids = top_candidates(logits, top, softcap, recent if penalized else None, repetition_penalty)
        if is_greedy(temperature):
            return ids[:, 0]
        logits = _cooled(logits, temperature)
    else:
        logits, ids = _cooled(capped(logits.float(), softcap), temperature), None
        if nucleus:
            logits, ids = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(logits, dim=-1)
    if nucleus:
        probs = keep_top_p(probs, top_p)
    choice = draw(probs, generator)  # (B, 1): a token id, or an index into ids (the top-k or the sorted order)
    return choice.squeeze(-1) if ids is None else ids.gather(-1, choice).squeeze(-1)


def candidates_needed(temperature: float, top_k: int | None, vocab: int) -> int | None:
    """How many of the best logits a draw picks among: 1 when greedy, top_k when it leaves out part of
    the vocabulary, else None (the whole vocabulary)."""
    return 1 if is_greedy(temperature) else top_k if top_k is not None and 0 < top_k < vocab else None


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """torch.multinomial(probs, 1, generator=generator) (B, 1) on the CPU, in that function's own
    arithmetic for one draw (the argmax of probs / q, q ~ Exp(1) from the generator: the same draws,
    bit for bit) without its ~10 validation ops, a fifth of a batch-1 token's sampling. A row that is
    not a distribution (NaN, from non-finite logits) is refused with a RuntimeError, as there. On a GPU:
    torch.multinomial itself."""
    if probs.device.type != "cpu":
        return torch.multinomial(probs, 1, generator=generator)
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    best, choice = torch.div(probs, q, out=q).max(dim=-1, keepdim=True)
    if math.isnan(sum(best.view(-1).tolist())):  # a NaN probability wins the race (the rest are >= 0)
        raise RuntimeError("probability tensor contains NaN: the model's logits are not finite")
    return choice


def top_candidates(logits: torch.Tensor, k: int, softcap: float | None, recent: torch.Tensor | None = None,
                   penalty: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best softcapped logits of each row (B, k), sorted descending, and their ids (B, k).

    With `recent` (B, W; -1 = empty) the penalty (>= 1: a float, or (B, 1) per row) applies first to
    each row's recent ids, without a pass over the vocabulary: it only lowers at most W logits of a
    row, so its k best are among the k + W best before it. Equal values keep the index order."""
    if recent is None:
        values, ids = cpu_matmul.topk(logits.float(), k)
        return capped(values, softcap), ids
    values, ids = cpu_matmul.topk(logits.float(), min(k + recent.size(1), logits.size(-1)))
    values = capped(values, softcap)
    hit = (ids.unsqueeze(-1) == recent.unsqueeze(1)).any(dim=-1)  # (B, k + W): a recent id
    values = torch.where(hit, torch.where(values > 0, values / penalty, values * penalty), values)
    values, order = torch.sort(values, dim=-1, descending=True, stable=True)
    return values[:, :k], ids.gather(-1, order[:, :k])


def _cooled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature; at temperature 1 the logits themselves (the same values: one op less a token)."""
    return logits if temperature == 1.0 else logits / temperature


def penalize_repeats(logits: torch.Tensor, recent: torch.Tensor, penalty: float) -> torch.Tensor:
    """`logits` (B, vocab) with every token id of a row's `recent` (B, W; -1 = empty) made less likely:
    a positive logit is divided by `penalty`, a negative one multiplied by it, once per distinct id."""
    hits = torch.zeros(logits.shape, dtype=torch.int32, device=logits.device)
    hits.scatter_add_(-1, recent.clamp(min=0), (recent >= 0).to(torch.int32))  # duplicates and empty slots add safely
    return torch.where(hits > 0, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def keep_top_p(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail of descending-sorted probabilities beyond mass `top_p` (the first token always stays)."""
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the tokens ranked above
    drop = mass_before >= top_p
    drop[..., 0] = False  # top_p 0 would otherwise drop every token
    return sorted_probs.masked_fill(drop, 0.0)


def capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """cap * tanh(logits / cap), exactly as the model's forward computes it; identity for None."""
    return logits if softcap is None else softcap_logits(logits, softcap)


def sample_many(logits: torch.Tensor, requests: list[tuple[int, dict]]) -> list[int]:
    """One token per row for several requests at once, each drawn as `sample_next` draws it.

    `logits` (R, vocab) holds the requests' rows back to back: `requests` lists, in that order,
    (rows, sample_next keyword arguments with the request's own generator); they come from one
    model, so they share its softcap. When every request
    is greedy or uses top-k (the server's default), the whole batch shares one top-k, one softcap,
    one softmax and one top-p pass, with per-row k, temperature and p (and, for a request whose
    settings carry `repetition_penalty` and its rows' `recent` tokens, the penalty applied to its
    rows before the top-k, as sample_next applies it); only the draw itself runs
    per request, from its own generator, so a request's tokens do not depend on the others (up to
    float rounding in the softmax of its k values). Otherwise each request goes through
    sample_next on its own rows.
    """
    ks = [candidates_needed(s["temperature"], s.get("top_k"), logits.size(-1)) for _, s in requests]
    if None in ks:  # a full-vocabulary draw somewhere: request by request
        return _one_by_one(logits, requests)
    penalties = [(s.get("repetition_penalty") or 1.0) if s.get("recent") is not None and s["recent"].numel() else 1.0
                 for _, s in requests]  # as in sample_next: no recent tokens, no penalty
    if min(penalties) < 1.0:  # raises logits: the whole vocabulary, request by request
        return _one_by_one(logits, requests)

    def per_row(values: list) -> torch.Tensor:  # one value per request -> (R, 1), repeated over its rows
        return torch.tensor([v for (n, _), v in zip(requests, values, strict=True) for _ in range(n)],
                            device=logits.device).unsqueeze(1)

    width, recent, rows_p = max(ks), None, 1.0
    if max(penalties) > 1.0:  # rows without a penalty get no recent ids
        window = next(s["recent"].size(1) for (_, s), p in zip(requests, penalties, strict=True) if p > 1.0)
        recent = torch.cat([s["recent"] if p > 1.0 else torch.full((n, window), -1, dtype=torch.long)
                            for (n, s), p in zip(requests, penalties, strict=True)]).to(logits.device)  # (R, W)
        rows_p = per_row(penalties)
    # one model: one softcap; (R, width), sorted descending
    scaled, top_ids = top_candidates(logits, width, requests[0][1].get("softcap"), recent, rows_p)
    temperature = per_row([1.0 if is_greedy(s["temperature"]) else s["temperature"] for _, s in requests])
    scaled = scaled / temperature
    if min(ks) < width:  # each row keeps its own k best
        scaled = scaled.masked_fill(torch.arange(width, device=logits.device) >= per_row(ks), float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    top_ps = [sample.get("top_p") for _, sample in requests]
    if any(p is not None and p < 1.0 for p in top_ps):
        probs = keep_top_p(probs, per_row([p if p is not None and p < 1.0 else float("inf") for p in top_ps]))
    choices, start = [], 0
    for (n, sample), k in zip(requests, ks, strict=True):
        if is_greedy(sample["temperature"]):
            choices.append(torch.zeros(n, 1, dtype=torch.long, device=logits.device))  # the argmax: first of the top-k
        else:
            # exactly its k columns: how a draw consumes the generator depends on the width
            choices.append(draw(probs[start:start + n, :k], sample["generator"]))
        start += n
    return top_ids.gather(-1, torch.cat(choices)).squeeze(-1).tolist()


def _one_by_one(logits: torch.Tensor, requests: list[tuple[int, dict]]) -> list[int]:
    chunks = logits.split([n for n, _ in requests])  # each request's rows, as views
    return [t for (_, sample), rows in zip(requests, chunks, strict=True) for t in sample_next(rows, **sample).tolist()]


def token_logprobs(logits: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """Log-probabilities (B, vocab) fp32 at temperature 1: the log-softmax of the softcapped logits,
    before any temperature, top-k or top-p (what an API's `logprobs` reports)."""
    return torch.log_softmax(capped(logits.float(), softcap), dim=-1)


def logprob_entries(logprobs: torch.Tensor, tokens: list[int], top: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per row of `logprobs` (B, vocab): (log-prob of tokens[row], the `top` most likely (id, log-prob))."""
    chosen = logprobs.gather(-1, torch.tensor(tokens, device=logprobs.device).unsqueeze(1)).squeeze(1).tolist()
    if top <= 0:
        return [(lp, []) for lp in chosen]
    values, ids = torch.topk(logprobs, min(top, logprobs.size(-1)), dim=-1)  # (B, top), sorted descending
    return [(lp, list(zip(i, v, strict=True))) for lp, i, v in zip(chosen, ids.tolist(), values.tolist(), strict=True)]
