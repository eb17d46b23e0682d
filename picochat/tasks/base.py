"""Task, TaskMixture and TaskSequence: indexable collections of conversations.

A `Task` is a read-only sequence of conversation dicts (`{"messages": [...], ...extras}`,
the one format of picochat.tokenizer.chat). It knows how to grade a model's answer
(`eval_type` "categorical" or "generative", `evaluate(conversation, response)`), and it can
be viewed through start/stop/step (`task[100:200:2]`, or the `start=`/`stop=`/`step=`
arguments of every task) without copying any data: a view is a `range` over the rows.

Mixtures and sequences are tasks too, so they can be sliced, nested and mixed again.
Both keep O(#tasks) state (the cumulative sizes), never an O(N) index list; see
`TaskMixture` for the exact shuffling semantics.
"""

from __future__ import annotations

import bisect
import copy
import itertools
import random
from collections.abc import Sequence
from typing import Any

from picochat.errors import DataError


class Task:
    """A sequence of conversations with an optional grader.

    Subclasses implement `num_rows()` (rows before any view) and `get_row(i)` (row i as a
    conversation dict); graded tasks also set `eval_type` and implement `evaluate`.
    """

    eval_type: str | None = None  # "categorical" | "generative" | None (training only)

    def __init__(self, start: int | None = None, stop: int | None = None, step: int | None = None):
        self._view: slice | range = slice(start, stop, step)

    # --- what subclasses provide ---------------------------------------------------------
    def num_rows(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} must implement num_rows()")

    def get_row(self, index: int) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must implement get_row()")

    def evaluate(self, conversation: dict, response: str) -> bool | int:
        """Grade `response` (the model's assistant text) against `conversation`'s reference."""
        raise NotImplementedError(f"{type(self).__name__} is a training task and has no evaluate()")

    # --- views ----------------------------------------------------------------------------
    @property
    def rows(self) -> range:
        """The underlying row indices this (view of the) task covers."""
        if isinstance(self._view, slice):
            self._view = range(self.num_rows())[self._view]
        return self._view

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            view = copy.copy(self)  # shares the loaded data; only the range differs
            view._view = self.rows[index]
            return view
        return self.get_row(self.rows[index])

    def __iter__(self):
        yield from map(self.get_row, self.rows)

    @property
    def name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        r = self.rows
        return f"{self.name}(rows={r.start}:{r.stop}:{r.step}, len={len(r)})"


def response_text(response: str | list[dict]) -> str:
    """A model response as plain text; a list of assistant parts is joined."""
    return response if isinstance(response, str) else "".join(part.get("text", "") for part in response)


def model_text(response: str | list[dict]) -> str:
    """The model's own words in a response: its text parts, without the tool calls and outputs.

    A tool call between two text parts becomes a space, so digits on either side of it never
    read as one number. The graders that look for the model's answer read this, so a number
    that only the calculator wrote (or the expression handed to it) is never taken as the answer.
    """
    if isinstance(response, str):
        return response
    pieces: list[str] = []
    for part in response:
        if part.get("type", "text") == "text":
            pieces.append(part.get("text", ""))
        elif pieces and pieces[-1] != " ":
            pieces.append(" ")
    return "".join(pieces)


GENERATED_SPLITS = ("train", "test")


class GeneratedTask(Task):
    """`size` generated rows; row i is a pure function of (key, split, i), via `rng(i)`."""

    eval_type = "generative"
    key = ""

    def __init__(self, split: str = "train", size: int = 1000, **view: int | None):
        super().__init__(**view)
        if split not in GENERATED_SPLITS:
            raise DataError(f"{type(self).__name__}: split must be one of {GENERATED_SPLITS}, not {split!r}")
        if size < 0:
            raise DataError(f"{type(self).__name__}: size must be >= 0, got {size}")
        self.split, self.size = split, size

    def num_rows(self) -> int:
        return self.size

    def rng(self, index: int) -> random.Random:
        """The generator of row `index`: seeded by a string, so identical in every process."""
        return random.Random(f"{self.key}:{self.split}:{index}")

    @property
    def name(self) -> str:
        return f"{type(self).__name__}[{self.split}]"


class FeistelPermutation:
    """A seeded bijection of range(n), computed per index in O(1) memory.

    A balanced Feistel network permutes [0, 4**h) for the smallest h with 4**h >= n (so the
    domain is < 4n); indices that land outside [0, n) are fed through again ("cycle walking")
    until they land inside, which keeps the map a bijection of [0, n). Expected walks: < 4.
    """

    ROUNDS = 6
    _M64 = (1 << 64) - 1

    def __init__(self, n: int, seed: int):
        if n < 0:
            raise ValueError(f"permutation size must be >= 0, got {n}")
        self.n = n
        self.half_bits = max(1, ((max(n - 1, 1)).bit_length() + 1) // 2)
        self.mask = (1 << self.half_bits) - 1
        self.keys = [_mix64((seed & self._M64) * 0x100000001B3 + r) for r in range(self.ROUNDS)]

    def _encrypt(self, x: int) -> int:
        left, right = x >> self.half_bits, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix64(right ^ key) & self.mask)
        return (left << self.half_bits) | right

    def __call__(self, index: int) -> int:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for a permutation of {self.n}")
        x = self._encrypt(index)
        while x >= self.n:
            x = self._encrypt(x)
        return x


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a cheap, well-mixed 64-bit hash for the Feistel round function."""
    x = (x + 0x9E3779B97F4A7C15) & FeistelPermutation._M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & FeistelPermutation._M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & FeistelPermutation._M64
    return x ^ (x >> 31)


class _Composite(Task):
    """Shared bookkeeping of mixtures and sequences: entries and their cumulative sizes."""

    def __init__(self, tasks: Sequence[Task], **view: int | None):
        super().__init__(**view)
        if not tasks:
            raise ValueError(f"{type(self).__name__} needs at least one task")
        self.tasks = list(tasks)
        self.offsets = [0, *itertools.accumulate(map(len, self.tasks))]  # rows before entry k; [-1] = total

    def num_rows(self) -> int:
        return self.offsets[-1]

    def _flat(self, row: int) -> int:
        """The flat index (over the entries laid end to end) that holds row `row`."""
        return row

    def _split(self, flat: int) -> tuple[int, int]:
        entry = bisect.bisect_right(self.offsets, flat) - 1
        return entry, flat - self.offsets[entry]

    def locate(self, index: int) -> tuple[int, int]:
        """(entry position in `tasks`, index inside that task) of row `index` of this view."""
        return self._split(self._flat(self.rows[index]))

    def get_row(self, index: int) -> dict:
        entry, local = self._split(self._flat(index))
        return self.tasks[entry][local]

    def __repr__(self) -> str:
        return f"{self.name}([{', '.join(map(repr, self.tasks))}], len={len(self)})"


class TaskSequence(_Composite):
    """The tasks one after another (a curriculum): all rows of tasks[0], then tasks[1], ..."""


class TaskMixture(_Composite):
    """A deterministic shuffled union of tasks.

    Semantics, exactly:
    - The mixture has N = sum(len(t) for t in tasks) rows. Row i is row `local` of entry
      `k`, where (k, local) comes from flat index p = P(i): P is a pseudo-random bijection of
      range(N) fixed by `seed` (a Feistel permutation, see `FeistelPermutation`) and p is
      split by the cumulative sizes of the entries (bisect).
    - One pass over the mixture (i = 0..N-1) therefore yields every (entry, local index) pair
      exactly once, in an order that depends only on the seed and the entries' lengths.
    - An entry listed twice (the same task object or an equal one) contributes all of its
      rows twice per pass: that is how a task is oversampled (x2, x3, ...).
    - Every contiguous stretch of the mixture holds each entry in proportion to its size,
      up to random fluctuation, since P behaves like a uniform shuffle.
    - Use another seed (e.g. seed + epoch) for a different order in a later pass.
    Memory is O(#tasks): nothing proportional to N is stored, so building a mixture of
    millions of rows is instant, and each lookup costs a few hash rounds plus a bisect.
    """

    def __init__(self, tasks: Sequence[Task], seed: int = 42, **view: int | None):
        super().__init__(tasks, **view)
        self.permutation = FeistelPermutation(self.offsets[-1], seed)

    def _flat(self, row: int) -> int:
        return self.permutation(row)
