"""A queue of token pieces cut into fixed-size blocks: the packing both packed loaders share.

Pieces (a document's tokens, or a rendered conversation with its target mask) are pushed at
the back; `take(n)` returns the next n + 1 tokens (inputs and targets of a block overlap by
one) and consumes n of them, so the last token of a block is the first of the next and no
token is skipped. `head()` names the piece the unread part starts in and how much of it is
read, which is all an exact resume needs.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np


class TokenStream:
    def __init__(self) -> None:
        self._pieces: deque = deque()  # [key, tokens (np.int64), keep (np.bool_) or None, read]
        self._available = 0

    def push(self, key: Any, tokens, keep=None, read: int = 0) -> None:
        tokens = np.asarray(tokens, dtype=np.int64)
        self._pieces.append([key, tokens, None if keep is None else np.asarray(keep, dtype=bool), read])
        self._available += len(tokens) - read

    def available(self) -> int:
        return self._available

    def head(self) -> tuple[Any, int] | None:
        """(key, tokens already read) of the front piece, or None when empty."""
        return (self._pieces[0][0], self._pieces[0][3]) if self._pieces else None

    def positions(self) -> list[tuple[Any, int]]:
        """(key, tokens already read) of every piece, front first."""
        return [(piece[0], piece[3]) for piece in self._pieces]

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The next n + 1 tokens and their keep flags (None if no piece has any); consumes n."""
        if self._available < n + 1:
            raise ValueError(f"TokenStream.take({n}) needs {n + 1} tokens, has {self._available}")
        tokens = np.empty(n + 1, dtype=np.int64)
        keep = np.ones(n + 1, dtype=bool)
        masked, filled = False, 0
        for key, ids, flags, read in self._pieces:
            count = min(n + 1 - filled, len(ids) - read)
            tokens[filled:filled + count] = ids[read:read + count]
            if flags is not None:
                keep[filled:filled + count] = flags[read:read + count]
                masked = True
            filled += count
            if filled == n + 1:
                break
        left = n
        while left:
            piece = self._pieces[0]
            count = min(left, len(piece[1]) - piece[3])
            piece[3] += count
            left -= count
            if piece[3] == len(piece[1]):
                self._pieces.popleft()
        self._available -= n
        return tokens, (keep if masked else None)

    def clear(self) -> None:
        self._pieces.clear()
        self._available = 0
