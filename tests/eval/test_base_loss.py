"""base-loss: bpb with its standard error, on the same val tokens as the in-training eval."""

from __future__ import annotations

import json
import math

import pytest
import torch

from picochat.cli import main
from picochat.errors import DataError
from picochat.eval.base_loss import same_tokens_as_training, training_eval
from picochat.eval.bpb import bpb_with_standard_error, evaluate_bpb, evaluate_bpb_with_se
from picochat.model.gpt import GPT, GPTConfig
from picochat.tokenizer import Tokenizer
from tests.train.conftest import build_corpus, make_documents


def test_standard_error_of_equal_batches_is_the_standard_error_of_the_mean():
    bpb, se = bpb_with_standard_error([(1.0, 100), (2.0, 100)])
    assert bpb == 1.5 and se == pytest.approx(0.5)  # sample std 0.707 / sqrt(2)
    bpb, se = bpb_with_standard_error([(1.0, 300), (2.0, 100)])
    assert bpb == 1.25  # weighted by bytes
    assert se == pytest.approx(math.sqrt(2 * (0.75**2 * 0.25**2 + 0.25**2 * 0.75**2)))
    assert bpb_with_standard_error([(1.7, 50)] * 10) == (pytest.approx(1.7), pytest.approx(0.0))
    assert math.isnan(bpb_with_standard_error([(1.7, 50)])[1])
    with pytest.raises(DataError, match="zero bytes"):
        bpb_with_standard_error([])


def test_the_standard_error_comes_from_the_batches_the_one_bpb_is_made_of():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, sequence_len=16))
    model.init_weights()
    batches = [(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))) for _ in range(5)]
    batches[1][1][0, :4] = -1  # ignored targets
    token_bytes = torch.tensor([0] + [1 + i % 3 for i in range(63)])  # id 0: a special token, no bytes
    bpb, se = evaluate_bpb_with_se(model, iter(batches), 5, token_bytes)
    assert bpb == evaluate_bpb(model, iter(batches), 5, token_bytes)
    parts = [(evaluate_bpb(model, iter([b]), 1, token_bytes), float(token_bytes[b[1].clamp(min=0)][b[1] >= 0].sum()))
             for b in batches]
    assert (bpb, se) == (pytest.approx(bpb_with_standard_error(parts)[0], rel=1e-9),
                         pytest.approx(bpb_with_standard_error(parts)[1], rel=1e-6))
    assert se > 0
    assert math.isnan(evaluate_bpb_with_se(model, iter(batches), 1, token_bytes)[1])  # one batch: no spread


def test_base_loss_reads_the_in_training_eval_tokens_and_reports_the_standard_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    build_corpus(tmp_path)
    Tokenizer.train(make_documents(300, seed=1), vocab_size=320).save(tmp_path / "tokenizer")
    assert main(["base-train", "--preset", "cpu-tiny", "--dtype", "fp32", "--num-iterations", "4", "--eval-every", "4",
                 "--eval-tokens", "2048", "--sample-every", "-1", "--tag", "se"]) == 0
    assert main(["base-loss", "--tag", "se", "--split-tokens", "2048", "--device-batch-size", "4",
                 "--max-new-tokens", "2", "--dtype", "fp32"]) == 0
    out = json.loads((tmp_path / "eval" / "base_loss_se_step4.json").read_text())
    assert out["training_eval_tokens"] == out["tokens_per_split"] == 2048 and out["batches_per_split"] == 4
    # the same tokens in the same rows (a different batch size): the same number
    assert out["val_bpb"] == pytest.approx(out["training_eval_val_bpb"], rel=1e-5)
    meta = json.loads(next((tmp_path / "checkpoints" / "base" / "se").glob("step_4/meta.json")).read_text())
    assert 0 < meta["metrics"]["val_bpb_se"] < 1  # training reports it too (over its own batches of 2 rows)
    assert 0 < out["val_bpb_se"] < out["val_bpb"] and 0 < out["train_bpb_se"] < out["train_bpb"]
    # a smaller train split: the val number is unchanged, the train split reads only its own batches
    assert main(["base-loss", "--tag", "se", "--split-tokens", "2048", "--train-tokens", "1024",
                 "--device-batch-size", "4", "--max-new-tokens", "2", "--dtype", "fp32"]) == 0
    fewer = json.loads((tmp_path / "eval" / "base_loss_se_step4.json").read_text())
    assert fewer["val_bpb"] == out["val_bpb"] and fewer["train_tokens"] == 1024 and fewer["tokens_per_split"] == 2048
    assert fewer["train_bpb"] != out["train_bpb"]
    assert main(["base-loss", "--tag", "se", "--train-tokens", "8", "--device-batch-size", "4"]) == 2


def test_the_training_eval_tokens_are_the_whole_batches_it_scored():
    # 1536 tokens in batches of 16 rows of 64 on one process: the eval scored one batch, 1024 tokens
    meta = {"args": {"eval_tokens": 1536, "device_batch_size": 16, "max_seq_len": 64}, "world_size": 1,
            "metrics": {"val_bpb": 2.0}}
    assert training_eval(meta) == {"training_eval_tokens": 1024, "training_eval_world_size": 1,
                                   "training_eval_val_bpb": 2.0}
    # base-loss in batches of 8 rows reads all 1536: not the tokens the training eval scored
    assert not same_tokens_as_training({**training_eval(meta), "tokens_per_split": 1536, "world_size": 1})
    assert same_tokens_as_training({**training_eval(meta), "tokens_per_split": 1024, "world_size": 1})
    # the same count on another number of processes: each rank reads its own documents, other text
    eight = {**meta, "args": {**meta["args"], "device_batch_size": 2}, "world_size": 8}
    assert training_eval(eight)["training_eval_tokens"] == 1024
    assert not same_tokens_as_training({**training_eval(eight), "tokens_per_split": 1024, "world_size": 1})
    assert "training_eval_tokens" not in training_eval({"args": {"eval_tokens": 1536}})  # batch unknown
