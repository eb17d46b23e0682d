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


def bpb_with_standard_error(batches: list[tuple[float, float]]) -> tuple[float, float]:
    """(bpb, standard error) over batches [(bpb_i, bytes_i)]: the byte-weighted mean and its
    ratio-estimator standard error sqrt(n/(n-1) * sum(w_i^2 (b_i - bpb)^2)), w_i = bytes_i / sum(bytes).

    Consecutive batches can come from one document, so this is a lower bound on the sampling error."""
    total = sum(nbytes for _, nbytes in batches)
    if not batches or total <= 0:
        raise DataError("bpb over zero bytes of text; evaluate more tokens")
    mean = sum(b * nbytes for b, nbytes in batches) / total
    n = len(batches)
    if n < 2:
        return mean, float("nan")
    spread = sum((nbytes / total) ** 2 * (b - mean) ** 2 for b, nbytes in batches)
    return mean, math.sqrt(spread * n / (n - 1))


@torch.no_grad()
def evaluate_bpb_with_se(model, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], steps: int,
                         token_bytes: torch.Tensor,
                         compute_dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """(bpb, its standard error across batches) over `steps` batches; batch i is summed across ranks.
    Too few tokens is an error, never inf."""
    if steps <= 0:
        raise DataError("bpb needs at least one batch; raise --eval-tokens (or --split-tokens) above B*T*world")
    device = token_bytes.device
    nats = torch.zeros(steps, dtype=torch.float64, device=device)  # per batch, so the spread is known
    nbytes_per = torch.zeros(steps, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for i in range(steps):
        x, y = next(batches)
        with torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32):
            loss = model(x, y, loss_reduction="none")  # (B, T) nats, 0 where y == -1
        nbytes = torch.where(y >= 0, token_bytes[y.clamp(min=0)], torch.zeros_like(y))
        nats[i] = (loss.float() * (nbytes > 0)).sum().double()  # only targets with bytes count
        nbytes_per[i] = nbytes.sum().double()
    if dist.is_initialized():
        dist.all_reduce(nats)
        dist.all_reduce(nbytes_per)
    model.train(was_training)
    total_bytes = nbytes_per.sum().item()
    if total_bytes == 0:
        raise DataError("bpb over zero bytes of text: the evaluation saw no ordinary tokens; use more eval tokens")
    bpb = nats.sum().item() / (math.log(2) * total_bytes)
    parts = [(n / (math.log(2) * b), b) for n, b in zip(nats.tolist(), nbytes_per.tolist()) if b > 0]
    return bpb, bpb_with_standard_error(parts)[1]


def evaluate_bpb(model, batches: Iterator, steps: int, token_bytes: torch.Tensor,
                 compute_dtype: torch.dtype = torch.float32) -> float:
    """bpb over `steps` batches (summed across ranks). Too few tokens is an error, never inf."""
    return evaluate_bpb_with_se(model, batches, steps, token_bytes, compute_dtype)[0]
