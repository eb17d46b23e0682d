"""Conversations -> training batches, two ways.

- `PackedConversations` (mid-training): rendered conversations are concatenated into
  one token stream (each starts with its own `<|bos|>`, so they stay separated) and
  cut into (B, T) blocks like pretraining text. Every token is a target by default;
  with `mask_user=True` the targets whose render mask is 0 (user text, tool output,
  the structural tokens around them) are set to -1.
- `PaddedConversations` + `sft_collate` (SFT): one conversation per row, right-padded
  to the longest row of the micro-batch, targets -1 wherever the mask is 0 or padding.
  With `bucket_widths` (for a compiled model) the width is rounded up to the next bucket,
  so the compiler sees a handful of shapes instead of one per batch width.

Both shard by rank (rank r of w takes conversations r, r+w, ... of the task, so every
conversation is used exactly once per epoch across ranks), count epochs, and save their
exact position with state_dict() / load_state_dict().
"""

from __future__ import annotations

import torch

from picochat.data.stream import TokenStream
from picochat.errors import DataError


def sft_collate(rows: list[tuple[list[int], list[int]]], pad_id: int,
                width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of shape (B, longest - 1): inputs padded with `pad_id`, targets with -1.

    Row i: inputs = ids[:-1]; targets = ids[1:], with -1 where mask[1:] == 0. With `width`
    (at least longest - 1) the rows are padded to that width instead.
    """
    if not rows:
        raise DataError("sft_collate got an empty batch")
    longest = max(len(ids) for ids, _ in rows) - 1
    if longest < 1:
        raise DataError("sft_collate needs conversations of at least 2 tokens")
    if width is not None and width < longest:
        raise DataError(f"sft_collate: width {width} is narrower than the longest row ({longest} tokens)")
    width = width or longest
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, (ids, mask) in enumerate(rows):
        row_ids = torch.tensor(ids, dtype=torch.long)
        inputs[r, :len(ids) - 1] = row_ids[:-1]
        targets[r, :len(ids) - 1] = torch.where(torch.tensor(mask[1:], dtype=torch.bool), row_ids[1:], -1)
    return inputs, targets


class _ConversationWalk:
    """This rank's walk over a task: positions 0, 1, 2, ... map to rows rank, rank+w, ... with epochs."""

    def __init__(self, task, rank: int, world_size: int):
        if len(task) < world_size:
            raise DataError(f"{task.name} has {len(task)} conversations, fewer than the {world_size} processes")
        self.task, self.rank, self.world_size = task, rank, world_size
        self.per_epoch = len(range(rank, len(task), world_size))

    def row(self, position: int) -> tuple[int, dict]:
        epoch, k = divmod(position, self.per_epoch)
        return epoch, self.task[self.rank + k * self.world_size]

    def resharded_position(self, states: list[dict]) -> int:
        """This rank's first position at or after the earliest conversation any old rank (state: its
        position, rank and world size) had not finished: some are seen twice, none skipped."""
        n = len(self.task)

        def absolute(s: dict) -> int:  # conversation index counted over epochs
            per_epoch = len(range(s["rank"], n, s["world_size"]))
            epoch, k = divmod(s["position"], per_epoch)
            return epoch * n + s["rank"] + k * s["world_size"]

        epoch, first = divmod(min(map(absolute, states)), n)
        return epoch * self.per_epoch + max(0, -(-(first - self.rank) // self.world_size))


class _Batches:
    """What both batchers share: this rank's walk, the batch shape, the device, the position and its state."""

    def __init__(self, task, tokenizer, batch_size: int, seq_len: int, rank: int, world_size: int,
                 device: torch.device | str):
        self.walk = _ConversationWalk(task, rank, world_size)
        self.tokenizer = tokenizer
        self.B, self.T = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.position = 0  # next conversation to render

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"position": self.position, "rank": self.rank, "world_size": self.world_size}

    def reshard_state(self, states: list[dict]) -> dict:
        return {"position": self.walk.resharded_position(states), "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state["world_size"] != self.world_size:
            raise DataError(f"data state saved with world size {state['world_size']}, "
                            f"this run has {self.world_size}")
        self.position = state["position"]


class PackedConversations(_Batches):
    """Infinite iterator of packed (inputs, targets) blocks of shape (B, T)."""

    def __init__(self, task, tokenizer, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", mask_user: bool = False,
                 max_conversation_tokens: int | None = None):
        super().__init__(task, tokenizer, batch_size, seq_len, rank, world_size, device)
        self.mask_user = mask_user
        self.max_tokens = max_conversation_tokens or 4 * seq_len
        self.stream = TokenStream()  # pieces keyed by their conversation's position

    def render(self, conversation: dict) -> tuple[list[int], list[int] | None]:
        ids, mask = self.tokenizer.render_conversation(conversation, max_tokens=self.max_tokens)
        return ids, (mask if self.mask_user else None)

    def _push(self, read: int = 0) -> None:
        ids, keep = self.render(self.walk.row(self.position)[1])
        self.stream.push(self.position, ids, keep, read)
        self.position += 1

    def tokens_per_epoch(self) -> int:
        """Tokens this rank streams in one pass (renders every conversation once)."""
        return sum(len(self.render(self.walk.row(p)[1])[0]) for p in range(self.walk.per_epoch))

    @property
    def epoch(self) -> int:
        head = self.stream.head()
        return (self.position if head is None else head[0]) // self.walk.per_epoch

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        need = self.B * self.T
        while self.stream.available() < need + 1:
            self._push()
        ids, keep = self.stream.take(need)
        buf = torch.from_numpy(ids)
        targets = buf[1:] if keep is None else torch.where(torch.from_numpy(keep[1:]), buf[1:], -1)
        return buf[:-1].view(self.B, self.T).to(self.device), targets.view(self.B, self.T).to(self.device)

    def state_dict(self) -> dict:
        head = self.stream.head()
        position, skip = (self.position, 0) if head is None else head
        return {**super().state_dict(), "position": position, "skip": skip}

    def reshard_state(self, states: list[dict]) -> dict:
        return {**super().reshard_state(states), "skip": 0}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.stream.clear()
        if state["skip"]:
            self._push(read=state["skip"])


def width_buckets(max_seq_len: int, count: int = 4) -> list[int]:
    """Batch widths for a compiled SFT run: max_seq_len / 2**k for k < count, ascending (e.g. 256..2048)."""
    return sorted({max(1, -(-max_seq_len // 2**k)) for k in range(count)})


class PaddedConversations(_Batches):
    """Infinite iterator of padded SFT micro-batches: (inputs, targets, real tokens) of B conversations.

    Real tokens are the inputs that are not padding (for honest tokens/s).
    """

    def __init__(self, task, tokenizer, batch_size: int, max_seq_len: int, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", bucket_widths: list[int] | None = None):
        super().__init__(task, tokenizer, batch_size, max_seq_len, rank, world_size, device)
        self.pad_id = tokenizer.encode_special("assistant_end")
        self.buckets = sorted(bucket_widths) if bucket_widths else None
        if self.buckets and self.buckets[-1] < max_seq_len:
            raise DataError(f"the widest bucket ({self.buckets[-1]}) is narrower than max_seq_len {max_seq_len}")

    @property
    def epoch(self) -> int:
        return self.position // self.walk.per_epoch

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        rows = [self.tokenizer.render_conversation(self.walk.row(p)[1], max_tokens=self.T + 1)
                for p in range(self.position, self.position + self.B)]
        self.position += self.B
        real = sum(len(ids) - 1 for ids, _ in rows)
        longest = max(len(ids) for ids, _ in rows) - 1
        width = next(w for w in self.buckets if w >= longest) if self.buckets else None
        x, y = sft_collate(rows, self.pad_id, width)
        return x.to(self.device), y.to(self.device), real
