"""A static key/value cache for incremental decoding.

Keys and values of every layer live in two pre-allocated tensors of shape
(num_layers, B, H_kv, max_len, D), the layout `F.scaled_dot_product_attention`
reads directly. `pos` counts the tokens already cached (the same for every row
of the batch); it is the rotary offset of the next token. Each layer writes its
new keys with `insert`, and the model calls `advance` once per forward, after
the last layer, so all layers of one forward write at the same offset.

A model that mixes the previous token's embedding into each token's (the smear option) also
keeps every position's embedding here, `embeds` (B, max_len, C) fp32, allocated on its first
use: the first token of the next call, whether a decode step or a prefill that continues the
cache, reads its predecessor's from it. Row operations (expand, copy_rows, keep_rows) carry it
along with the keys and values.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, batch_size: int, num_layers: int, num_kv_heads: int, head_dim: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.embeds: torch.Tensor | None = None  # (B, max_len, C) fp32, for the smear option
        self.pos = 0

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    def insert(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H_kv, T_new, D) at [pos, pos+T_new); return all keys/values so far (views)."""
        end = self.room_for(k.size(2))
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def room_for(self, n: int) -> int:
        """The end position after n more tokens; an error if they do not fit."""
        end = self.pos + n
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens do not fit in max_len={self.max_len}; "
                             "build the cache with a larger max_len")
        return end

    def swap_embeddings(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Store the embeddings x (B, T, C) at [pos, pos+T) and return the one before each row's
        first, (B, C), zeros at position 0. With `positions` (B,) (T == 1, continuous batching)
        row b is at positions[b] instead."""
        B, T, C = x.shape
        if self.embeds is None:
            self.embeds = torch.zeros(self.batch_size, self.max_len, C, device=x.device, dtype=torch.float32)
        if positions is None:
            end = self.room_for(T)
            before = self.embeds[:B, self.pos - 1].clone() if self.pos > 0 else x.new_zeros(B, C)
            self.embeds[:B, self.pos:end] = x
            return before
        rows = torch.arange(B, device=x.device)
        before = self.embeds[rows, (positions - 1).clamp(min=0)] * (positions > 0).unsqueeze(1)
        self.embeds[rows, positions] = x[:, 0]
        return before

    def copy_rows(self, rows: int | slice, source: KVCache, source_rows: int | slice, length: int) -> None:
        """Rows `rows` of this cache get the first `length` positions of `source`'s rows
        `source_rows` (one source row fills many): keys, values and stored embeddings."""
        self.k[:, rows, :, :length] = source.k[:, source_rows, :, :length]
        self.v[:, rows, :, :length] = source.v[:, source_rows, :, :length]
        if source.embeds is not None:
            if self.embeds is None:
                self.embeds = source.embeds.new_zeros(self.batch_size, self.max_len, source.embeds.size(2))
            self.embeds[rows, :length] = source.embeds[source_rows, :length]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Shrink the batch to `rows` (int64 indices), in that order."""
        self.k, self.v = self.k.index_select(1, rows), self.v.index_select(1, rows)
        if self.embeds is not None:
            self.embeds = self.embeds.index_select(0, rows)

    def advance(self, n: int) -> None:
        """Mark n more tokens as cached (called by the model after its last layer)."""
        self.pos += n

    def reset(self) -> None:
        self.pos = 0

    def expand(self, batch_size: int) -> KVCache:
        """A new cache of `batch_size` rows, each a copy of this batch-1 cache (prefill once, sample many)."""
        if self.batch_size != 1:
            raise ValueError(f"expand() needs a batch-1 cache, this one has {self.batch_size} rows")
        layers, _, heads, max_len, head_dim = self.k.shape
        out = KVCache(batch_size, layers, heads, head_dim, max_len, self.k.device, self.k.dtype)
        out.copy_rows(slice(None), self, slice(0, 1), self.pos)
        out.pos = self.pos
        return out
