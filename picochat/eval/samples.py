"""Greedy completions of fixed prompts: a quick look at what a base model learned."""

from __future__ import annotations

import torch

BASE_PROMPTS = (
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
)


@torch.no_grad()
def greedy_complete(model, tokenizer, prompt: str, max_new_tokens: int = 16,
                    compute_dtype: torch.dtype = torch.float32) -> str:
    """Argmax continuation of `prompt` by full recomputation (short outputs only; the engine does the rest)."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt, prepend=tokenizer.bos_id)
    limit = model.config.sequence_len
    was_training = model.training
    model.eval()
    out: list[int] = []
    for _ in range(max_new_tokens):
        x = torch.tensor([(ids + out)[-limit:]], dtype=torch.long, device=device)
        with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
            logits = model(x)
        nxt = int(logits[0, -1].argmax())
        if nxt == tokenizer.bos_id:
            break
        out.append(nxt)
    model.train(was_training)
    return tokenizer.decode(out)


def sample_prompts(model, tokenizer, prompts=BASE_PROMPTS, max_new_tokens: int = 16,
                   compute_dtype: torch.dtype = torch.float32) -> list[dict]:
    return [{"prompt": p, "completion": greedy_complete(model, tokenizer, p, max_new_tokens, compute_dtype)}
            for p in prompts]
