"""Next-token sampling from logits: greedy, temperature, top-k and top-p (nucleus), seeded."""

from __future__ import annotations

import torch

from picochat.model.gpt import softcap_logits


def sample_next(
    logits: torch.Tensor,
    generator: torch.Generator | None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """One token per row from `logits` (B, vocab) -> (B,) int64.

    temperature 0 is greedy (argmax). top_k keeps the k most likely tokens, top_p the smallest
    set whose probability mass reaches p; both apply before the temperature-scaled draw.
    All randomness comes from `generator`, so a seeded generator makes the draw reproducible.

    `softcap`: the logits are raw and the model's softcap (cap * tanh(x / cap)) is still to be
    applied. It is monotonic, so greedy and top-k pick on the raw logits and cap only the k
    kept values: the same draw as capping everything first, without two passes over the vocab.
    (Only beyond ~9x the cap, where fp32 tanh rounds to exactly 1, would capping first make ties
    that the raw logits break.)
    """
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    vocab = logits.size(-1)
    if top_k is not None and 0 < top_k < vocab:
        # Work on the k best only: a (B, k) softmax instead of (B, vocab) is most of the speed.
        top_logits, top_ids = torch.topk(logits.float(), top_k, dim=-1)  # (B, k), sorted descending
        probs = torch.softmax(capped(top_logits, softcap) / temperature, dim=-1)
        if top_p is not None and top_p < 1.0:
            probs = keep_top_p(probs, top_p)
        choice = torch.multinomial(probs, 1, generator=generator)  # (B, 1) index into top-k
        return top_ids.gather(-1, choice).squeeze(-1)
    logits = capped(logits.float(), softcap) / temperature
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_ids = torch.sort(logits, dim=-1, descending=True)
        probs = keep_top_p(torch.softmax(sorted_logits, dim=-1), top_p)
        choice = torch.multinomial(probs, 1, generator=generator)
        return sorted_ids.gather(-1, choice).squeeze(-1)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def keep_top_p(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail of descending-sorted probabilities beyond mass `top_p` (the first token always stays)."""
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the tokens ranked above
    return sorted_probs.masked_fill(mass_before >= top_p, 0.0)


def capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """cap * tanh(logits / cap), exactly as the model's forward computes it; identity for None."""
    return logits if softcap is None else softcap_logits(logits, softcap)
