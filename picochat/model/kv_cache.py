"""A static key/value cache for incremental decoding.

Keys and values of every layer live in two pre-allocated tensors of shape
(num_layers, B, H_kv, max_len, D), the layout `F.scaled_dot_product_attention`
reads directly. `pos` counts the tokens already cached (the same for every row
of the batch); it is the rotary offset of the next token. Each layer writes its
new keys with `insert`, and the model calls `advance` once per forward, after
the last layer, so all layers of one forward write at the same offset.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, batch_size: int, num_layers: int, num_kv_heads: int, head_dim: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    @property
    def num_layers(self) -> int:
        return self.k.size(0)

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
        out.k[:, :, :, :self.pos] = self.k[:, :, :, :self.pos]
        out.v[:, :, :, :self.pos] = self.v[:, :, :, :self.pos]
        out.pos = self.pos
        return out
