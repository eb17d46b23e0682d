"""Bits per byte: a tokenizer-independent loss.

bpb = sum of per-token cross-entropy (nats) over target tokens with byte length > 0
      / (ln 2 * total UTF-8 bytes of those targets)
Special tokens have 0 bytes and are excluded from both sums; targets of -1 too.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist

from picochat.errors import DataError


@torch.no_grad()
def evaluate_bpb(
    model,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    token_bytes: torch.Tensor,
    compute_dtype: torch.dtype = torch.float32,
) -> float:
    """bpb over `steps` batches (summed across ranks). Too few tokens is an error, never inf."""
    if steps <= 0:
        raise DataError("bpb needs at least one batch; raise --eval-tokens (or --split-tokens) above B*T*world")
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for _ in range(steps):
        x, y = next(batches)
        with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
            loss = model(x, y, loss_reduction="none")  # (B, T) nats, 0 where y == -1
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[y.clamp(min=0)], torch.zeros_like(y))
        counted = nbytes > 0
        total_nats += (loss.float() * counted).sum().double()
        total_bytes += nbytes.sum().double()
    if dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    model.train(was_training)
    if total_bytes.item() == 0:
        raise DataError("bpb over zero bytes of text: the evaluation saw no ordinary tokens; use more eval tokens")
    return total_nats.item() / (math.log(2) * total_bytes.item())
