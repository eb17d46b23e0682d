"""Categorical (multiple-choice) evaluation of a chat model: pick the best option letter by logits.

For each item, the prompt is `render_for_completion(conversation)` (ends with
`<|assistant_start|>`); the model's next-token logits are restricted to the
item's own option letters (an item with 3 options competes among A-C only) and
the argmax letter is graded by the task. Prompts are batched, right-padded, and
the logits read at each row's last real position.
"""

from __future__ import annotations

import torch

from picochat.errors import DataError
from picochat.eval.core import all_reduce_sum


@torch.no_grad()
def evaluate_categorical(model, tokenizer, task, batch_size: int = 8, max_items: int | None = None,
                         rank: int = 0, world_size: int = 1, compute_dtype: torch.dtype = torch.float32) -> dict:
    """{"accuracy", "correct", "total"} over the task's items (split across ranks, summed); with
    `max_items`, that many items spread evenly over the task (item i * len // max_items), so a task
    stored subject by subject is scored on every subject."""
    device = next(model.parameters()).device
    n = len(task) if max_items is None else min(len(task), max_items)
    limit = model.config.sequence_len
    was_training = model.training
    model.eval()
    correct = 0
    indices = [i * len(task) // n for i in range(rank, n, world_size)]
    for start in range(0, len(indices), batch_size):
        convs = [task[i] for i in indices[start : start + batch_size]]
        prompts = [tokenizer.render_for_completion(c)[-limit:] for c in convs]
        width = max(len(p) for p in prompts)
        x = torch.tensor([list(p) + [tokenizer.bos_id] * (width - len(p)) for p in prompts], dtype=torch.long,
                         device=device)
        with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
            logits = model(x)  # (B, width, vocab)
        for r, (conv, p) in enumerate(zip(convs, prompts)):
            letters = conv["letters"]
            # Each letter is one token (A-Z always are: every byte is in the vocabulary).
            scores = logits[r, len(p) - 1, [tokenizer.encode(letter)[0] for letter in letters]]
            correct += int(bool(task.evaluate(conv, letters[int(scores.argmax())])))
    correct, total = (int(v) for v in all_reduce_sum([correct, len(indices)], device))
    model.train(was_training)
    if total == 0:
        raise DataError(f"{task.name}: no items to evaluate (max_items={max_items}, len={len(task)})")
    return {"accuracy": correct / total, "correct": correct, "total": total}
