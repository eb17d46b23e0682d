"""The packed pretraining loader: packing, rank coverage, exact resume, clear errors."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from picochat.data.loader import PackedLoader
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
            ids = loader._encode_unit(unit).tolist()
            docs, cur = [], None
            for t in ids:
                if t == tok.bos_id:
                    if cur is not None:
                        docs.append(cur)
                    cur = []
                else:
                    cur.append(t)
            if cur is not None:
                docs.append(cur)
            seen.extend(tok.decode(d) for d in docs)
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
