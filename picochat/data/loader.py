"""Pretraining loaders: shards -> documents, each `<|bos|>` + its tokens -> (inputs, targets) (B, T).

Two ways to lay documents into rows:
- `PackedLoader` (default): every document is appended to one token stream and each step
  cuts `B*T + 1` tokens from it, `inputs = buf[:-1].view(B, T)`, `targets = buf[1:]`.
  Documents are packed across rows, nothing is padded or dropped, and the last token of a
  batch is the first token of the next one.
- `BestFitLoader` (`--loader bestfit`): every row starts at a document's `<|bos|>`. From a
  buffer of documents (1,000 by default) a row takes the longest that still fits, again and
  again; when none fits it crops the shortest to fill the row exactly. Nothing is padded, but
  the cropped tails are dropped (about a third of the tokens at T=2048 on web text), and at a
  short context a row mostly sees document starts. The buffer is refilled 128 documents at a
  time, in shard order.
- `AlignedLoader` (`--loader aligned`): best-fit rows of document heads, and packed rows of
  what longer documents have beyond them. A document's first T + 1 tokens go into the best-fit
  buffer (so every head is read from its `<|bos|>`, with its whole context, as best-fit rows read
  it); the rest, from its T-th token on (each of those tokens is predicted once, as in a packed
  stream), goes into a stream of tails that is cut into rows like the packed loader's. A row is
  a tail row while tail rows are behind the tails' share of the tokens admitted so far, so the
  two kinds mix in proportion all along. Only heads cropped to fill a row lose tokens.
  `tail_keep` (`--tail-keep`, default 1) keeps, in the first epoch, the tails of that share of the
  documents, chosen by a fixed pseudo-random draw per document; the others give only their heads,
  so the first pass holds more document starts and reads more documents for its tokens. Later
  epochs keep every tail, so a run longer than the first pass still reads the whole text.

Sharding: the loaders walk every row group of every train shard in order ("units"); within
each row group rank r of w takes documents r, r+w, r+2w, ... so across ranks every document
is used exactly once per epoch, and ranks stay balanced to within one document per row
group, even for a one-row-group shard. After the last unit the epoch counter goes up and the
walk starts again. A rank that a whole pass gives no document (row groups with fewer texts than
processes) is a DataError, not an endless wait.

Tokenization runs on a background thread (tiktoken releases the GIL and uses its own
threads), a few units ahead, so the training loop does not wait for it.

Resume at another world size (`reshard_state`) restarts every rank at the earliest row group any
old rank had reached: a few documents are seen twice, none is skipped.

Exact resume: tokenization is deterministic, so a position in the walk reproduces the
documents token for token. The packed loader's state is (epoch, unit, skip): the unit whose
tokens start the unread part of the stream and how many of its tokens were already read.
The best-fit loader's state is the next document to enter the buffer and the
(epoch, unit, index) of every document in the buffer; the aligned loader's adds (epoch, unit,
index, tokens read) of every tail in its stream and the token and row counts that pace the mix.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from picochat.data.shards import check_text_column
from picochat.data.stream import TokenStream
from picochat.errors import DataError

_STOP = object()
LOADERS = ("packed", "bestfit", "aligned")


class _ShardWalk:
    """The walk over row groups, its background tokenizer thread and the state checks both loaders share."""

    def __init__(self, files: list[Path], tokenizer, batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu", prefetch_units: int = 4,
                 max_epochs: int | None = None):
        if not files:
            raise DataError("no shards to read; run `picochat data prepare` or pass --data-dir")
        for f in files:
            check_text_column(Path(f))
        self.files = [Path(f) for f in files]
        self.tokenizer = tokenizer
        self.B, self.T = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.prefetch_units, self.max_epochs = prefetch_units, max_epochs
        # The walk order: (file index, row group) for every row group of every shard.
        self.units = [(fi, rg) for fi, f in enumerate(self.files)
                      for rg in range(pq.ParquetFile(f).num_row_groups)]
        if not self.units:
            raise DataError(f"shards {[f.name for f in self.files]} contain no row groups (no documents)")
        self._sizes = [f.stat().st_size for f in self.files]  # a shard rebuilt under its old name differs here
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop_event = threading.Event()

    # ---- producer (background thread) --------------------------------------------------------
    def _encode_unit(self, unit: int) -> list[np.ndarray]:
        """This rank's documents of one row group, each `<|bos|>` + its tokens (empty texts skipped)."""
        fi, rg = self.units[unit]
        texts = pq.ParquetFile(self.files[fi]).read_row_group(rg, columns=["text"]).column("text").to_pylist()
        mine = [t for t in texts[self.rank:: self.world_size] if t]
        if not mine:
            return []
        return [np.asarray(ids, dtype=np.int64) for ids in self.tokenizer.encode(mine, prepend=self.tokenizer.bos_id)]

    def _produce(self, epoch: int, unit: int, q: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                if self.max_epochs is not None and epoch >= self.max_epochs:
                    q.put(_STOP)
                    return
                item = (epoch, unit, self._encode_unit(unit))
                while not stop.is_set():
                    with contextlib.suppress(queue.Full):
                        q.put(item, timeout=0.1)
                        break
                unit += 1
                if unit == len(self.units):
                    epoch, unit = epoch + 1, 0
        except BaseException as e:  # noqa: BLE001 - every error, KeyboardInterrupt included, is re-raised in the training thread
            q.put(e)

    def _start_walk(self, epoch: int, unit: int) -> None:
        self._empty_units = 0  # units in a row that gave this rank no document
        self._queue = queue.Queue(maxsize=self.prefetch_units)
        self._stop_event = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(epoch, unit, self._queue, self._stop_event),
                                        daemon=True, name="document-loader")
        self._thread.start()

    def _next_unit(self) -> tuple[int, int, list[np.ndarray]]:
        item = self._queue.get()
        if item is _STOP or isinstance(item, BaseException):
            self._queue.put(item)  # the producer has ended: a later call gets the same answer, not a wait
            if item is _STOP:
                raise StopIteration
            raise item
        self._empty_units = 0 if item[2] else self._empty_units + 1
        if self._empty_units == len(self.units):  # a whole epoch without a document: it would never end
            raise DataError(f"shards {[f.name for f in self.files]} give rank {self.rank} of {self.world_size} "
                            f"no documents (rank r takes texts r, r+{self.world_size}, ... of each row group, and "
                            "skips empty ones); use fewer processes or shards with more documents")
        return item

    def _batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) on the device from a (B, T + 1) array, or a flat B*T + 1 stream."""
        buf = torch.from_numpy(rows)
        buf = buf.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else buf.to(self.device)
        if buf.dim() == 1:
            return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)
        return buf[:, :-1], buf[:, 1:]

    def __iter__(self):
        return self

    @property
    def epoch(self) -> int:
        return self.state_dict()["epoch"]

    def _position(self) -> dict:
        return {"rank": self.rank, "world_size": self.world_size, "files": [f.name for f in self.files],
                "num_units": len(self.units), "sizes": self._sizes}

    def _check_state(self, state: dict) -> None:
        if state.get("world_size", self.world_size) != self.world_size:
            raise DataError(f"loader state was saved with world size {state['world_size']}, this run has "
                            f"{self.world_size}; resume with the same number of processes")
        self._check_source(state)
        self.close()

    def _check_source(self, state: dict) -> None:
        """A state (of this rank or of any old rank) must come from the same shards and the same --loader."""
        if state.get("files") and state["files"] != [f.name for f in self.files]:
            raise DataError("loader state was saved for different shard files; resume with the same --data-dir")
        rebuilt = [f.name for f, old, new in zip(self.files, state.get("sizes") or self._sizes, self._sizes)
                   if old != new]
        if rebuilt or state.get("num_units", len(self.units)) != len(self.units):
            shown = ", ".join(rebuilt[:3]) or "their row groups"
            raise DataError(f"loader state was saved for shards with other contents ({shown} changed since, e.g. "
                            "rebuilt by `picochat data prepare --force`): its positions would point at other "
                            "documents; resume with the data it was saved with, or train without --resume")
        if state.get("kind", "packed") != self.kind:
            raise DataError(f"loader state was saved by the {state.get('kind', 'packed')} loader, this run uses "
                            f"--loader {self.kind}; resume with the same --loader")

    def close(self) -> None:
        if self._thread is not None:
            self._stop_event.set()
            with contextlib.suppress(queue.Empty):  # unblock a producer waiting on a full queue
                while True:
                    self._queue.get_nowait()
            self._thread.join(timeout=5)
        self._thread = None


class PackedLoader(_ShardWalk):
    """Infinite iterator of (inputs, targets) int64 tensors of shape (B, T) on `device`: documents packed."""

    kind = "packed"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._start = (0, 0, 0)  # epoch, unit, skip
        self._stream = TokenStream()

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._thread is None:
            self._stream.clear()
            self._start_walk(*self._start[:2])
            self._skip_first = self._start[2]
        need = self.B * self.T
        while self._stream.available() < need + 1:
            epoch, unit, docs = self._next_unit()
            tokens = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)
            self._stream.push((epoch, unit), tokens, read=self._skip_first)
            self._skip_first = 0
        tokens, _ = self._stream.take(need)
        return self._batch(tokens)

    def state_dict(self) -> dict:
        """Exact position of the next unread token (the head of the stream is never fully read)."""
        head = self._stream.head() if self._thread is not None else None
        epoch, unit, skip = self._start if head is None else (*head[0], head[1])
        return {"kind": self.kind, "epoch": int(epoch), "unit": int(unit), "skip": int(skip), **self._position()}

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state)
        self._start = (int(state["epoch"]), int(state["unit"]), int(state["skip"]))

    def reshard_state(self, states: list[dict]) -> dict:
        """This rank's state in a new world, from every old rank's: the start of the earliest row group
        any old rank was reading (ranks stay within a row group or so of each other)."""
        for s in states:
            self._check_source(s)
        epoch, unit = min((s["epoch"], s["unit"]) for s in states)
        return {"kind": self.kind, "epoch": epoch, "unit": unit, "skip": 0, **self._position()}

    def close(self) -> None:
        if self._thread is not None:  # keep the position: a later next() or state_dict() continues from it
            state = self.state_dict()
            self._start = (state["epoch"], state["unit"], state["skip"])
        super().close()
        if hasattr(self, "_stream"):
            self._stream.clear()


class BestFitLoader(_ShardWalk):
    """Infinite iterator of (inputs, targets) (B, T) whose every row starts at a document's `<|bos|>`."""

    kind = "bestfit"
    REFILL = 128  # documents moved into the buffer at a time
    _head_len: int | None = None  # what of a document the buffer holds (None: all of it)

    def __init__(self, *args, buffer_size: int = 1000, **kwargs):
        super().__init__(*args, **kwargs)
        if buffer_size < 1:
            raise DataError(f"best-fit loader: buffer_size={buffer_size} must be at least 1")
        self.buffer_size = buffer_size
        self._cursor = (0, 0, 0)  # the next document to enter the buffer: epoch, unit, index
        self._buffer_ids: list[tuple[int, int, int]] = []
        self._buffer: list[np.ndarray] = []
        self._staged: list[np.ndarray] | None = None  # documents of the cursor's unit

    def _refill(self) -> None:
        epoch, unit, k = self._cursor
        if self._staged is None:
            got_epoch, got_unit, self._staged = self._next_unit()
            if (got_epoch, got_unit) != (epoch, unit):
                raise RuntimeError(f"document walk out of step: at {(got_epoch, got_unit)}, expected {(epoch, unit)}")
        end = min(len(self._staged), k - k % self.REFILL + self.REFILL)
        for i in range(k, end):
            self._admit((epoch, unit, i), self._staged[i])
        if end == len(self._staged):
            self._staged = None
            unit += 1
            epoch, unit, end = (epoch + 1, 0, 0) if unit == len(self.units) else (epoch, unit, 0)
        self._cursor = (epoch, unit, end)

    def _admit(self, doc_id: tuple[int, int, int], doc: np.ndarray) -> None:
        """A document enters the buffer."""
        self._buffer_ids.append(doc_id)
        self._buffer.append(doc)

    def _restore(self) -> dict[int, list[np.ndarray]]:
        """Re-encode the documents a saved state holds (each unit once, in order) and restart the walk;
        returns the units' documents."""
        units = dict.fromkeys(unit for _, unit, _ in self._buffer_ids)
        docs = {unit: self._encode_unit(unit) for unit in units}
        self._buffer = [docs[unit][i][: self._head_len] for _, unit, i in self._buffer_ids]
        self._staged = None
        self._start_walk(*self._cursor[:2])
        return docs

    def _best_fit_row(self, row: np.ndarray) -> None:
        """Fill one row from the buffer: the longest document that fits, again and again, then the
        shortest cropped."""
        pos, width = 0, len(row)
        while pos < width:
            while len(self._buffer) < self.buffer_size:
                self._refill()
            lengths = np.fromiter(map(len, self._buffer), dtype=np.int64, count=len(self._buffer))
            fits = np.where(lengths <= width - pos, lengths, -1)
            i = int(fits.argmax())  # the longest that fits, the earliest of equals
            if fits[i] < 0:
                i = int(lengths.argmin())  # nothing fits: crop the shortest
            doc = self._buffer.pop(i)[: width - pos]
            del self._buffer_ids[i]
            row[pos:pos + len(doc)] = doc
            pos += len(doc)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._thread is None:
            self._restore()
        rows = np.empty((self.B, self.T + 1), dtype=np.int64)
        for r in range(self.B):
            self._best_fit_row(rows[r])
        return self._batch(rows)

    def state_dict(self) -> dict:
        epoch, unit, index = self._cursor
        return {"kind": self.kind, "epoch": int(epoch), "unit": int(unit), "index": int(index),
                "buffer": [list(map(int, d)) for d in self._buffer_ids], **self._position()}

    def reshard_state(self, states: list[dict]) -> dict:
        """This rank's state in a new world: an empty buffer refilled from the earliest row group that any
        old rank's buffer or cursor was in."""
        for s in states:
            self._check_source(s)
        epoch, unit = min((d[0], d[1]) for s in states for d in [*s["buffer"], (s["epoch"], s["unit"])])
        return {"kind": self.kind, "epoch": epoch, "unit": unit, "index": 0, "buffer": [], **self._position()}

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state)
        self._cursor = (int(state["epoch"]), int(state["unit"]), int(state["index"]))
        self._buffer_ids = [tuple(d) for d in state["buffer"]]
        self._buffer, self._staged = [], None


class AlignedLoader(BestFitLoader):
    """Best-fit rows of document heads (the first T + 1 tokens) mixed in proportion with packed rows
    of the rest of each document (in the first epoch, of a `tail_keep` share of the documents)."""

    kind = "aligned"

    def __init__(self, *args, tail_keep: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0.0 <= tail_keep <= 1.0:
            raise DataError(f"aligned loader: tail_keep={tail_keep} is outside [0, 1]; pass --tail-keep between "
                            "0 (heads only) and 1 (every tail)")
        self.tail_keep = tail_keep
        self._head_len = self.T + 1
        self._tails = TokenStream()
        self._tail_ids: list[list[int]] = []  # tails to restore: [epoch, unit, index, tokens read]
        self._counts = [0, 0, 0, 0]  # tokens admitted, of them in tails; rows made, of them tail rows

    def _admit(self, doc_id: tuple[int, int, int], doc: np.ndarray) -> None:
        super()._admit(doc_id, doc[: self._head_len])
        # the first epoch keeps a tail by a fixed pseudo-random draw per (epoch, unit, index), so resumes and
        # ranks agree; later epochs keep every tail
        keep = len(doc) > self._head_len and (self.tail_keep >= 1.0 or doc_id[0] > 0 or zlib.crc32(
            str(tuple(map(int, doc_id))).encode()) % 1000 < 1000 * self.tail_keep)
        self._counts[0] += len(doc) if keep else min(len(doc), self._head_len)
        if keep:  # the tail starts at the head's last token, its first input
            self._tails.push(doc_id, doc[self.T:])
            self._counts[1] += len(doc) - self.T

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._thread is None:
            docs = self._restore()
            self._tails.clear()
            for epoch, unit, i, read in self._tail_ids:
                if unit not in docs:
                    docs[unit] = self._encode_unit(unit)
                self._tails.push((epoch, unit, i), docs[unit][i][self.T:], read=read)
        rows = np.empty((self.B, self.T + 1), dtype=np.int64)
        for r in range(self.B):
            while len(self._buffer) < self.buffer_size:  # admit documents (and their tails) first
                self._refill()
            admitted, tails, made, tail_rows = self._counts
            # a tail row while tail rows are behind the tails' share of the tokens admitted
            if self._tails.available() > self.T and tail_rows * admitted < tails * (made + 1):
                rows[r] = self._tails.take(self.T)[0]
                self._counts[3] += 1
            else:
                self._best_fit_row(rows[r])
            self._counts[2] += 1
        return self._batch(rows)

    def state_dict(self) -> dict:
        tails = self._tail_ids if self._thread is None else [[*key, read] for key, read in self._tails.positions()]
        return {**super().state_dict(), "tails": [list(map(int, t)) for t in tails], "counts": list(self._counts),
                "tail_keep": self.tail_keep}

    def _check_source(self, state: dict) -> None:
        super()._check_source(state)
        if state.get("tail_keep", 1.0) != self.tail_keep:
            raise DataError(f"loader state was saved with --tail-keep {state.get('tail_keep', 1.0)}, this run has "
                            f"--tail-keep {self.tail_keep}; resume with the same --tail-keep")

    def reshard_state(self, states: list[dict]) -> dict:
        """As best-fit's, with the earliest row group of any old rank's tails counted too; the new ranks
        start with no tails and fresh counts."""
        merged = [{**s, "buffer": [*s["buffer"], *(t[:3] for t in s["tails"])]} for s in states]
        return {**super().reshard_state(merged), "tails": [], "counts": [0, 0, 0, 0], "tail_keep": self.tail_keep}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._tail_ids = [list(t) for t in state["tails"]]
        self._counts = [int(c) for c in state["counts"]]
        self._tails.clear()

    def close(self) -> None:
        if self._thread is not None:  # keep the tails: a later next() or state_dict() continues from them
            self._tail_ids = self.state_dict()["tails"]
        super().close()


def make_loader(kind: str, *args, **kwargs) -> PackedLoader | BestFitLoader:
    """The loader named by --loader ('packed', 'bestfit' or 'aligned')."""
    if kind not in LOADERS:
        raise DataError(f"--loader {kind!r} is unknown; use one of {', '.join(LOADERS)}")
    return {"packed": PackedLoader, "bestfit": BestFitLoader, "aligned": AlignedLoader}[kind](*args, **kwargs)
