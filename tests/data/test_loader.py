"""The pretraining loaders: packing, best-fit and aligned rows, rank coverage, exact resume, clear errors."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from picochat.data.loader import LOADERS, AlignedLoader, BestFitLoader, PackedLoader, make_loader
from picochat.data.shards import list_shards, write_shard
from picochat.errors import DataError
from picochat.tokenizer import Tokenizer
from tests.train.conftest import build_corpus, make_documents


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    data_dir = build_corpus(root, n_docs=300, shards=3, row_group_size=25)
    tok = Tokenizer.train(make_documents(200, seed=3), vocab_size=300)
    return data_dir, tok


def test_batches_are_shifted_and_bos_separated(corpus):
    data_dir, tok = corpus
    train, _ = list_shards(data_dir)
    loader = PackedLoader(train, tok, batch_size=2, seq_len=32)
    x, y = next(loader)
    assert x.shape == y.shape == (2, 32) and x.dtype == torch.long
    flat_x, flat_y = x.flatten(), y.flatten()
    assert torch.equal(flat_x[1:], flat_y[:-1])  # targets are inputs shifted by one
    assert flat_x[0].item() == tok.bos_id  # the stream starts with a document's <|bos|>
    x2, _ = next(loader)
    assert x2.flatten()[0].item() == flat_y[-1].item()  # no token skipped between batches
    loader.close()


def test_every_document_exactly_once_per_epoch_across_ranks(corpus):
    data_dir, tok = corpus
    train, _ = list_shards(data_dir)
    expected = []
    for f in train:
        expected.extend(pq.read_table(f).column("text").to_pylist())
    seen = []
    for rank in range(3):
        loader = PackedLoader(train, tok, batch_size=1, seq_len=8, rank=rank, world_size=3)
        for unit in range(len(loader.units)):
            for doc in loader._encode_unit(unit):
                assert doc[0] == tok.bos_id and tok.bos_id not in doc[1:]
                seen.append(tok.decode(doc[1:].tolist()))
    assert sorted(seen) == sorted(expected)


def test_exact_resume_mid_epoch_and_across_epochs(corpus):
    data_dir, tok = corpus
    train, _ = list_shards(data_dir)
    a = PackedLoader(train, tok, batch_size=4, seq_len=64)
    for _ in range(7):
        next(a)
    state = a.state_dict()
    expected = []
    while a.epoch < 1 or len(expected) < 10:  # run past the end of the epoch
        expected.append(next(a))
    expected += [next(a) for _ in range(10)]
    a.close()
    b = PackedLoader(train, tok, batch_size=4, seq_len=64)
    b.load_state_dict(state)
    got = [next(b) for _ in range(len(expected))]
    b.close()
    for (x1, y1), (x2, y2) in zip(expected, got):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_resume_refuses_other_world_size(corpus):
    data_dir, tok = corpus
    train, _ = list_shards(data_dir)
    a = PackedLoader(train, tok, 1, 8, rank=0, world_size=2)
    next(a)
    state = a.state_dict()
    a.close()
    b = PackedLoader(train, tok, 1, 8)
    with pytest.raises(DataError, match="world size"):
        b.load_state_dict(state)


def test_bad_shard_directories(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list_shards(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .parquet"):
        list_shards(tmp_path / "empty")
    write_shard(tmp_path / "one" / "shard_00000.parquet", ["a doc"])
    with pytest.raises(DataError, match="one shard"):
        list_shards(tmp_path / "one")
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"content": ["x"]}), bad / f"shard_{i}.parquet")
    with pytest.raises(DataError, match="no 'text' column"):
        list_shards(bad)
    (tmp_path / "junk").mkdir()
    for i in range(2):
        (tmp_path / "junk" / f"shard_{i}.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable parquet"):
        list_shards(tmp_path / "junk")


def _documents(loader, tok):
    """Every document of one epoch on this loader's rank, as token lists with their <|bos|>."""
    return [doc.tolist() for unit in range(len(loader.units)) for doc in loader._encode_unit(unit)]


def test_best_fit_rows_start_at_bos_and_hold_whole_documents(corpus):
    data_dir, tok = corpus
    train, _ = list_shards(data_dir)
    loader = BestFitLoader(train, tok, batch_size=4, seq_len=48, buffer_size=20)
    docs = {tuple(d) for d in _documents(loader, tok)}
    for _ in range(5):
        x, y = next(loader)
        assert x.shape == y.shape == (4, 48)
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the same rows shifted by one
        for row in torch.cat([x, y[:, -1:]], dim=1).tolist():
            assert row[0] == tok.bos_id  # every row starts a document
            starts = [i for i, t in enumerate(row) if t == tok.bos_id] + [len(row)]
            pieces = [tuple(row[a:b]) for a, b in itertools.pairwise(starts)]
            for piece in pieces[:-1]:
                assert piece in docs  # whole documents, in one piece
            last = pieces[-1]
            assert last in docs or any(d[:len(last)] == last for d in docs)  # the last one may be cropped
    loader.close()


def test_best_fit_takes_the_longest_document_that_fits():
    class Tok:
        bos_id = 0

    loader = BestFitLoader.__new__(BestFitLoader)
    loader.B, loader.T, loader.buffer_size = 1, 9, 3
    loader._buffer = [[0, 1], [0, 2, 2, 2, 2, 2, 2], [0, 3, 3]]
    loader._buffer = [np.array(d) for d in loader._buffer]
    loader._buffer_ids = [(0, 0, 0), (0, 0, 1), (0, 0, 2)]
    loader._thread = object()  # started
    loader.device = torch.device("cpu")
    loader._refill = lambda: (loader._buffer.append(np.array([0, 4, 4, 4, 4, 4])),
                              loader._buffer_ids.append((0, 1, 0)))
    x, y = next(loader)
    # capacity 10: the 7-token document, then the 3-token one fits exactly
    assert torch.cat([x[0], y[0, -1:]]).tolist() == [0, 2, 2, 2, 2, 2, 2, 0, 3, 3]


def test_best_fit_every_document_enters_once_per_epoch(corpus):
    data_dir, tok = corpus
    train, _ = list_shards(data_dir)
    loader = BestFitLoader(train, tok, batch_size=2, seq_len=32, buffer_size=10, max_epochs=1)
    expected = [(0, u, i) for u in range(len(loader.units)) for i in range(len(loader._encode_unit(u)))]
    entered = []
    original = loader._refill

    def spy():
        before = len(loader._buffer_ids)
        original()
        entered.extend(loader._buffer_ids[before:])

    loader._refill = spy
    with pytest.raises(StopIteration):
        while True:
            next(loader)
    assert entered == expected[:len(entered)] and len(entered) >= len(expected) - 1
    loader.close()


@pytest.mark.parametrize("kind", ["bestfit", "aligned"])
def test_best_fit_exact_resume_across_epochs(corpus, kind):
    data_dir, tok = corpus
    train, _ = list_shards(data_dir)
    a = make_loader(kind, train, tok, batch_size=3, seq_len=40, buffer_size=16)
    for _ in range(9):
        next(a)
    state = a.state_dict()
    assert len(state["buffer"]) >= 16  # refills come 128 documents (here a row group) at a time
    expected = []
    while a.epoch < 1 or len(expected) < 10:
        expected.append(next(a))
    a.close()
    b = make_loader(kind, train, tok, batch_size=3, seq_len=40, buffer_size=16)
    b.load_state_dict(state)
    got = [next(b) for _ in range(len(expected))]
    b.close()
    for (x1, y1), (x2, y2) in zip(expected, got):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def _aligned_rows(loader, bos_id):
    """Every row of one epoch of an aligned loader, split into (head rows, tail rows)."""
    head_rows, tail_rows = [], []
    with pytest.raises(StopIteration):
        while True:
            x, y = next(loader)
            for row in torch.cat([x, y[:, -1:]], dim=1).tolist():
                (head_rows if row[0] == bos_id else tail_rows).append(row)
    loader.close()
    return head_rows, tail_rows


def test_aligned_rows_are_document_heads_and_the_tails_in_order(corpus):
    data_dir, tok = corpus
    train, _ = list_shards(data_dir)
    T = 24
    loader = AlignedLoader(train, tok, batch_size=4, seq_len=T, buffer_size=12, max_epochs=1)
    docs = _documents(loader, tok)
    heads = {tuple(d[:T + 1]) for d in docs}
    tails = [t for d in docs if len(d) > T + 1 for t in d[T:]]  # in walk order, no separator
    head_rows, tail_rows = _aligned_rows(loader, tok.bos_id)
    for row in head_rows:  # best-fit rows of heads: whole heads, the last one maybe cropped
        starts = [i for i, t in enumerate(row) if t == tok.bos_id] + [len(row)]
        pieces = [tuple(row[a:b]) for a, b in itertools.pairwise(starts)]
        assert all(p in heads for p in pieces[:-1])
        assert any(h[:len(pieces[-1])] == pieces[-1] for h in heads)
    # tail rows continue one another (the last token of one is the first of the next) through the tails
    read = [t for row in tail_rows for t in row[:-1]] + tail_rows[-1][-1:]
    assert read == tails[:len(read)] and len(read) > len(tails) // 2
    # the two kinds mix in proportion all along: tail rows' share of any run of rows follows the tails' share
    share = sum(len(d) - T for d in docs if len(d) > T + 1) / sum(map(len, docs))
    assert abs(len(tail_rows) / (len(head_rows) + len(tail_rows)) - share) < 0.1


def test_aligned_tail_keep_trains_on_whole_tails_of_a_share_of_the_documents(corpus):
    data_dir, tok = corpus
    train, _ = list_shards(data_dir)
    T = 24
    loader = AlignedLoader(train, tok, batch_size=4, seq_len=T, buffer_size=12, max_epochs=1, tail_keep=0.4)
    docs = [d for d in _documents(loader, tok) if len(d) > T + 1]
    head_rows, tail_rows = _aligned_rows(loader, tok.bos_id)
    read = [t for row in tail_rows for t in row[:-1]] + tail_rows[-1][-1:]
    # the tail stream is the whole tails of some documents, in walk order: match them greedily
    kept, pos = [], 0
    for d in docs:
        tail = d[T:]
        if read[pos:pos + len(tail)] == tail or (pos + len(tail) > len(read) and read[pos:] == tail[:len(read) - pos]):
            kept.append(d)
            pos += len(tail)
        if pos >= len(read):
            break
    assert pos >= len(read) and 0.2 < len(kept) / docs.index(kept[-1]) < 0.6  # about 40% of the documents
    # every head is still read, so rows hold more document starts than with every tail kept
    all_heads, all_tails = _aligned_rows(AlignedLoader(train, tok, batch_size=4, seq_len=T, buffer_size=12,
                                                       max_epochs=1), tok.bos_id)
    assert abs(len(head_rows) - len(all_heads)) <= 1
    assert len(tail_rows) / (len(head_rows) + len(tail_rows)) < 0.9 * len(all_tails) / len(all_tails + all_heads)


def test_aligned_tail_keep_holds_for_the_first_epoch_only(corpus):
    data_dir, tok = corpus
    train, _ = list_shards(data_dir)
    T = 24
    loader = AlignedLoader(train, tok, batch_size=4, seq_len=T, buffer_size=12, max_epochs=2, tail_keep=0.0)
    docs = _documents(loader, tok)
    one_epoch_heads, _ = _aligned_rows(AlignedLoader(train, tok, batch_size=4, seq_len=T, buffer_size=12,
                                                     max_epochs=1), tok.bos_id)
    rows = []
    with pytest.raises(StopIteration):
        while True:
            x, y = next(loader)
            rows.extend(torch.cat([x, y[:, -1:]], dim=1).tolist())
    loader.close()
    first_tail = next(i for i, row in enumerate(rows) if row[0] != tok.bos_id)
    assert first_tail >= len(one_epoch_heads) - 12  # the first epoch is heads only (a buffer's worth overlaps)
    tail_rows = [row for row in rows if row[0] != tok.bos_id]
    read = [t for row in tail_rows for t in row[:-1]] + tail_rows[-1][-1:]
    tails = [t for d in docs if len(d) > T + 1 for t in d[T:]]  # the second epoch: every tail, in walk order
    assert read == tails[:len(read)] and len(read) > len(tails) // 2


def test_aligned_tail_keep_resumes_exactly_and_is_checked(corpus):
    data_dir, tok = corpus
    train, _ = list_shards(data_dir)
    a = make_loader("aligned", train, tok, batch_size=3, seq_len=40, buffer_size=16, tail_keep=0.5)
    for _ in range(7):
        next(a)
    state = a.state_dict()
    expected = [next(a) for _ in range(12)]
    a.close()
    b = make_loader("aligned", train, tok, batch_size=3, seq_len=40, buffer_size=16, tail_keep=0.5)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, [next(b) for _ in range(12)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    b.close()
    with pytest.raises(DataError, match="saved with --tail-keep 0.5, this run has --tail-keep 1.0; resume with"):
        make_loader("aligned", train, tok, 3, 40, buffer_size=16).load_state_dict(state)
    with pytest.raises(DataError, match="--tail-keep between 0"):
        make_loader("aligned", train, tok, 3, 40, tail_keep=1.5)


def test_loader_kind_is_checked(corpus):
    data_dir, tok = corpus
    train, _ = list_shards(data_dir)
    a = make_loader("packed", train, tok, 1, 8)
    next(a)
    state = a.state_dict()
    a.close()
    with pytest.raises(DataError, match="--loader"):
        make_loader("bestfit", train, tok, 1, 8).load_state_dict(state)
    with pytest.raises(DataError, match="--loader 'nope'"):
        make_loader("nope", train, tok, 1, 8)


@pytest.mark.parametrize("kind", LOADERS)
def test_another_world_size_restarts_at_the_earliest_row_group_and_skips_nothing(corpus, kind):
    data_dir, tok = corpus
    train, _ = list_shards(data_dir)
    old = []
    for rank, steps in ((0, 9), (1, 6)):  # rank 1 is behind: it read fewer batches
        loader = make_loader(kind, train, tok, 2, 32, rank=rank, world_size=2)
        for _ in range(steps):
            next(loader)
        old.append(loader.state_dict())
        loader.close()
    earliest = min((s["epoch"], s["unit"]) for s in old)
    for rank in range(3):
        new = make_loader(kind, train, tok, 2, 32, rank=rank, world_size=3)
        state = new.reshard_state(old)
        assert (state["epoch"], state["unit"]) <= earliest and state["world_size"] == 3
        new.load_state_dict(state)
        x, _ = next(new)
        docs = [d.tolist() for u in range(state["unit"], len(new.units)) for d in new._encode_unit(u)]
        if kind == "packed":  # this rank's documents of that row group come first, in order
            assert x[0].tolist() == [t for d in docs for t in d][:32]
        elif kind == "aligned":  # the first row is tails, from that row group's documents on
            assert x[0].tolist() == [t for d in docs if len(d) > 33 for t in d[32:]][:32]
        else:  # a row holds this rank's documents from that row group on
            row = x[0].tolist()
            end = row.index(tok.bos_id, 1) if tok.bos_id in row[1:] else len(row)
            assert any(d[:end] == row[:end] for d in docs)
        new.close()


@pytest.mark.parametrize("kind", LOADERS)
def test_a_rank_without_documents_is_a_clear_error_not_a_hang(corpus, tmp_path, kind):
    _, tok = corpus
    path = tmp_path / "shard_val.parquet"
    write_shard(path, ["One document here.", "", "Another document."], row_group_size=2)
    first = make_loader(kind, [path], tok, 1, 8, rank=0, world_size=2)  # rank 0 has both documents
    x, _ = next(first)
    assert x.shape == (1, 8) and (kind == "aligned" or x[0, 0].item() == tok.bos_id)  # aligned may start with tails
    first.close()
    loader = make_loader(kind, [path], tok, 1, 8, rank=1, world_size=2)  # rank 1: the empty text, then nothing
    raised = []

    def first_batch():
        try:
            next(loader)
        except Exception as e:  # noqa: BLE001 - the test looks at what was raised
            raised.append(e)

    worker = threading.Thread(target=first_batch, daemon=True)
    worker.start()
    worker.join(timeout=30)
    loader.close()
    assert not worker.is_alive(), "the loader waited forever for a document"
    assert len(raised) == 1 and isinstance(raised[0], DataError)
    assert "rank 1 of 2 no documents" in str(raised[0]) and "fewer processes" in str(raised[0])


@pytest.mark.parametrize("kind", LOADERS)
def test_another_world_size_still_checks_the_shards_and_the_loader_kind(corpus, kind):
    data_dir, tok = corpus
    train, _ = list_shards(data_dir)
    old = []
    for rank in range(2):
        loader = make_loader(kind, train, tok, 1, 8, rank=rank, world_size=2)
        next(loader)
        old.append(loader.state_dict())
        loader.close()
    with pytest.raises(DataError, match="different shard files"):
        make_loader(kind, train[:-1], tok, 1, 8, world_size=3).reshard_state(old)
    other = "bestfit" if kind == "packed" else "packed"
    with pytest.raises(DataError, match=f"--loader {other}"):
        make_loader(other, train, tok, 1, 8, world_size=3).reshard_state(old)


@pytest.mark.parametrize("kind", LOADERS)
def test_close_keeps_the_position(corpus, kind):
    data_dir, tok = corpus
    train, _ = list_shards(data_dir)
    a = make_loader(kind, train, tok, 2, 32)
    for _ in range(5):
        next(a)
    state = a.state_dict()
    a.close()
    assert a.state_dict() == state
    b = make_loader(kind, train, tok, 2, 32)
    b.load_state_dict(state)
    for _ in range(3):
        (x1, y1), (x2, y2) = next(a), next(b)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    a.close()
    b.close()


@pytest.mark.parametrize("kind", LOADERS)
def test_shards_rebuilt_under_their_old_names_are_refused_on_resume(corpus, tmp_path, kind):
    """A state's positions are row groups and documents of the shards it was saved with: shards
    rebuilt under the same names (other documents, other row groups) must not resume silently."""
    _, tok = corpus
    paths = [tmp_path / f"shard_{i:05d}.parquet" for i in range(2)]
    for i, path in enumerate(paths):
        write_shard(path, [f"Document {i}.{j} is here." for j in range(40)], row_group_size=10)
    loader = make_loader(kind, paths, tok, 1, 8)
    next(loader)
    state = loader.state_dict()
    loader.close()
    make_loader(kind, paths, tok, 1, 8).load_state_dict(state)  # the same shards: fine
    write_shard(paths[1], [f"Another text {j}, longer than before." for j in range(40)], row_group_size=10)
    with pytest.raises(DataError, match=r"other contents \(shard_00001.parquet changed"):
        make_loader(kind, paths, tok, 1, 8).load_state_dict(state)
    write_shard(paths[1], [f"Document 1.{j} is here." for j in range(40)], row_group_size=20)
    with pytest.raises(DataError, match="other contents"):
        make_loader(kind, paths, tok, 1, 8).load_state_dict(state)


def _next_within(loader, seconds: float = 20):
    """What next(loader) raises (or returns), or "hang" if it is still waiting after `seconds`."""
    result = []

    def call():
        try:
            result.append(next(loader))
        except BaseException as e:  # noqa: BLE001 - the test looks at what was raised
            result.append(e)

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(timeout=seconds)
    return result[0] if result else "hang"


@pytest.mark.parametrize("kind", LOADERS)
def test_next_after_the_last_epoch_raises_stop_again_instead_of_waiting(corpus, kind):
    data_dir, tok = corpus
    train, _ = list_shards(data_dir)
    extra = {"buffer_size": 16} if kind != "packed" else {}
    loader = make_loader(kind, train, tok, 2, 32, max_epochs=1, **extra)
    assert len(list(loader)) > 0  # runs until StopIteration
    assert isinstance(_next_within(loader), StopIteration)
    loader.close()


@pytest.mark.parametrize("kind", LOADERS)
def test_a_tokenizer_error_is_raised_again_on_the_next_call_instead_of_waiting(corpus, kind):
    data_dir, tok = corpus
    train, _ = list_shards(data_dir)

    class Broken:
        bos_id = tok.bos_id

        def encode(self, *args, **kwargs):
            raise RuntimeError("tokenizer failed")

    loader = make_loader(kind, train, Broken(), 2, 32)
    for _ in range(2):
        got = _next_within(loader)
        assert isinstance(got, RuntimeError) and "tokenizer failed" in str(got)
    loader.close()
