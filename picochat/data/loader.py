"""Packed pretraining loader: shards -> `<|bos|>`-separated token stream -> (inputs, targets).

Every document is encoded with `<|bos|>` in front and appended to one token
stream; each step cuts `B*T + 1` tokens from it, `inputs = buf[:-1].view(B, T)`,
`targets = buf[1:].view(B, T)`. Documents are packed across rows, nothing is
padded. The last token of a batch is also the first token of the next one, so
no token is skipped.

Sharding: the stream walks every row group of every train shard in order
("units"); within each row group rank r of w takes documents r, r+w, r+2w, ...
so across ranks every document is used exactly once per epoch, and ranks stay
balanced to within one document per row group, even for a one-row-group shard.
After the last unit the epoch counter goes up and the walk starts again.

Tokenization runs on a background thread (tiktoken releases the GIL and uses
its own threads), a few units ahead, so the training loop does not wait for it.

Exact resume: the state is (epoch, unit, skip) = the unit whose tokens start the
unread part of the stream and how many of its tokens were already consumed.
Tokenization is deterministic, so restarting the walk there reproduces the
stream token for token.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from picochat.data.shards import check_text_column
from picochat.errors import DataError

_STOP = object()


class PackedLoader:
    """Infinite iterator of (inputs, targets) int64 tensors of shape (B, T) on `device`."""

    def __init__(
        self,
        files: list[Path],
        tokenizer,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        prefetch_units: int = 4,
        max_epochs: int | None = None,
    ):
        if not files:
            raise DataError("no shards to read; run `picochat data prepare` or pass --data-dir")
        for f in files:
            check_text_column(Path(f))
        self.files = [Path(f) for f in files]
        self.tokenizer = tokenizer
        self.B, self.T = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.prefetch_units = prefetch_units
        self.max_epochs = max_epochs
        # The walk order: (file index, row group) for every row group of every shard.
        self.units: list[tuple[int, int]] = []
        for fi, f in enumerate(self.files):
            self.units.extend((fi, rg) for rg in range(pq.ParquetFile(f).num_row_groups))
        if not self.units:
            raise DataError(f"shards {[f.name for f in self.files]} contain no row groups (no documents)")
        self._start = (0, 0, 0)  # epoch, unit, skip
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop_event = threading.Event()
        self._pending: deque = deque()  # [epoch, unit, tokens (np.int32), read position]

    # ---- producer (background thread) --------------------------------------------------------
    def _encode_unit(self, unit: int) -> np.ndarray:
        fi, rg = self.units[unit]
        texts = pq.ParquetFile(self.files[fi]).read_row_group(rg, columns=["text"]).column("text").to_pylist()
        mine = [t for t in texts[self.rank :: self.world_size] if t]
        if not mine:
            return np.zeros(0, dtype=np.int32)
        encoded = self.tokenizer.encode(mine, prepend=self.tokenizer.bos_id)
        return np.fromiter((i for ids in encoded for i in ids), dtype=np.int32, count=sum(map(len, encoded)))

    def _produce(self, epoch: int, unit: int, q: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                if self.max_epochs is not None and epoch >= self.max_epochs:
                    q.put(_STOP)
                    return
                item = (epoch, unit, self._encode_unit(unit))
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                unit += 1
                if unit == len(self.units):
                    epoch, unit = epoch + 1, 0
        except BaseException as e:  # noqa: BLE001 - every error, KeyboardInterrupt included, is re-raised in the training thread
            q.put(e)

    def _ensure_started(self) -> None:
        if self._thread is not None:
            return
        epoch, unit, skip = self._start
        self._queue = queue.Queue(maxsize=self.prefetch_units)
        self._stop_event = threading.Event()
        self._thread = threading.Thread(
            target=self._produce, args=(epoch, unit, self._queue, self._stop_event), daemon=True, name="packed-loader"
        )
        self._thread.start()
        self._pending.clear()
        self._skip_first = skip

    def _pull_unit(self) -> None:
        item = self._queue.get()
        if item is _STOP:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        epoch, unit, tokens = item
        start = self._skip_first
        self._skip_first = 0
        self._pending.append([epoch, unit, tokens, start])

    # ---- consumer ----------------------------------------------------------------------------
    def __iter__(self):
        return self

    def _available(self) -> int:
        return sum(len(p[2]) - p[3] for p in self._pending)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._ensure_started()
        need = self.B * self.T + 1
        while self._available() < need:
            self._pull_unit()
        out = np.empty(need, dtype=np.int64)
        filled = 0
        for p in self._pending:
            take = min(need - filled, len(p[2]) - p[3])
            out[filled : filled + take] = p[2][p[3] : p[3] + take]
            filled += take
            if filled == need:
                break
        # Consume B*T tokens: the last token stays as the first input of the next batch.
        consume = need - 1
        while consume:
            p = self._pending[0]
            take = min(consume, len(p[2]) - p[3])
            p[3] += take
            consume -= take
            if p[3] == len(p[2]):
                self._pending.popleft()
        buf = torch.from_numpy(out)
        if self.device.type == "cuda":
            buf = buf.pin_memory().to(self.device, non_blocking=True)
        else:
            buf = buf.to(self.device)
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)

    @property
    def epoch(self) -> int:
        return self.state_dict()["epoch"]

    # ---- resume ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Exact position of the next unread token."""
        if self._thread is None or not self._pending:
            epoch, unit, skip = self._start
        else:
            # The head of the buffer is never fully read (the last token of a batch stays).
            epoch, unit, _, skip = self._pending[0]
        return {
            "epoch": int(epoch), "unit": int(unit), "skip": int(skip),
            "rank": self.rank, "world_size": self.world_size,
            "files": [f.name for f in self.files], "num_units": len(self.units),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("world_size", self.world_size) != self.world_size:
            raise DataError(
                f"loader state was saved with world size {state['world_size']}, this run has {self.world_size}; "
                "resume with the same number of processes"
            )
        if state.get("files") and state["files"] != [f.name for f in self.files]:
            raise DataError("loader state was saved for different shard files; resume with the same --data-dir")
        self.close()
        self._start = (int(state["epoch"]), int(state["unit"]), int(state["skip"]))

    def close(self) -> None:
        if self._thread is not None:
            self._stop_event.set()
            # Unblock a producer waiting on a full queue.
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=5)
        self._thread = None
        self._pending.clear()
