"""Cross-rank helpers: start every rank from the same weights, average gradients.

The training loop (every stage) reduces gradients through picochat.optim.sharded, which
also shards the optimiser state; `sync_gradients` is the unsharded path (the reference the
sharded one is tested and benchmarked against): every rank all-reduces every gradient and
keeps the full optimiser state.

Why explicit calls instead of wrapping the model in DistributedDataParallel:
- gradient accumulation needs no `no_sync()` dance: micro-batches just accumulate
  into .grad locally, and the gradients are reduced once, after the last backward;
- the model stays a plain module (checkpoints, evals and torch.compile see no wrapper);
- the same code runs on gloo (CPU) and nccl (GPU), and a world of 1 costs nothing.
`sync_gradients` does not overlap communication with the backward pass (the sharded path
does); it flattens grads into a few large buckets so the all-reduce itself is efficient.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn

BUCKET_BYTES = 32 << 20


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _buckets(tensors: list[torch.Tensor], bucket_bytes: int) -> list[list[int]]:
    """Indices of `tensors` grouped by (device, dtype) into buckets of about bucket_bytes."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        by_kind[(t.device, t.dtype)].append(i)
    buckets: list[list[int]] = []
    for indices in by_kind.values():
        current, size = [], 0
        for i in indices:
            current.append(i)
            size += tensors[i].numel() * tensors[i].element_size()
            if size >= bucket_bytes:
                buckets.append(current)
                current, size = [], 0
        if current:
            buckets.append(current)
    return buckets


def _unflatten_into(tensors: list[torch.Tensor], bucket: list[int], flat: torch.Tensor) -> None:
    """Copy the flat concatenation of `tensors[i]` for i in `bucket` back into those tensors."""
    for i, part in zip(bucket, flat.split([tensors[i].numel() for i in bucket])):
        tensors[i].copy_(part.view_as(tensors[i]))


@torch.no_grad()
def broadcast_parameters(model: nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers to every rank (no-op in a world of 1)."""
    if _world_size() == 1:
        return
    unique = list({t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}.values())
    for bucket in _buckets(unique, BUCKET_BYTES):
        flat = torch.cat([unique[i].reshape(-1) for i in bucket])
        dist.broadcast(flat, src=src)
        _unflatten_into(unique, bucket, flat)


@torch.no_grad()
def sync_gradients(model: nn.Module, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Average every trainable parameter's .grad over ranks; a missing grad counts as zero.

    Afterwards every trainable parameter has a .grad, identical on all ranks.
    """
    world = _world_size()
    if world == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    # Launch every bucket's all-reduce, then wait: buckets overlap on the wire.
    pending = []
    for bucket in _buckets(grads, bucket_bytes):
        flat = torch.cat([grads[i].reshape(-1) for i in bucket])
        # SUM then divide: gloo has no AVG.
        pending.append((bucket, flat, dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True)))
    for bucket, flat, work in pending:
        work.wait()
        flat.div_(world)
        _unflatten_into(grads, bucket, flat)
