import itertools

import pytest
import torch

from picochat.model import GPTConfig, build_model
from picochat.optim import build_optimizers
from picochat.runtime import Dist
from picochat.train.loop import LoopConfig, Trainer
from picochat.train.schedules import (
    constant_then_linear_to_zero,
    cosine_to_zero,
    linear_to_zero,
    warmup_constant_warmdown,
)


def test_warmup_constant_warmdown_shape():
    n = 100
    lr = [warmup_constant_warmdown(s, n, warmup_steps=10, warmdown_ratio=0.2, final_lr_frac=0.1) for s in range(n)]
    assert lr[0] == pytest.approx(0.1)
    assert lr[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in lr[10:80])
    assert all(a >= b for a, b in itertools.pairwise(lr[80:]))  # monotone warmdown
    assert lr[-1] == pytest.approx(0.1 + 0.9 * (1 / 20))
    assert warmup_constant_warmdown(n, n, 10, 0.2, 0.1) == pytest.approx(0.1)


def test_mid_and_sft_schedules():
    assert constant_then_linear_to_zero(0, 100) == 1.0
    assert constant_then_linear_to_zero(79, 100) == 1.0
    assert constant_then_linear_to_zero(90, 100) == pytest.approx(0.5)
    assert constant_then_linear_to_zero(100, 100) == 0.0
    assert linear_to_zero(0, 10, init_frac=0.02) == pytest.approx(0.02)
    assert linear_to_zero(5, 10) == pytest.approx(0.5)


def test_cosine_weight_decay_goes_from_one_to_zero():
    n = 100
    values = [cosine_to_zero(s, n) for s in range(n + 1)]
    assert values[0] == 1.0 and values[50] == pytest.approx(0.5) and values[n] == pytest.approx(0.0)
    assert all(a > b for a, b in itertools.pairwise(values))


def test_the_loop_scales_the_decay_of_groups_with_initial_weight_decay(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    torch.manual_seed(0)
    model = build_model(GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=32, sequence_len=16), "cpu")
    adamw, muon = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004,
                                   weight_decay=0.01, muon_weight_decay=0.3)
    cfg = LoopConfig(stage="base", tag="wd", num_iterations=10, grad_accum_steps=1, tokens_per_step=16)
    trainer = Trainer(model, [adamw, muon], None, cfg, Dist(), None, lr_multiplier=lambda s, n: 1.0,
                      weight_decay_multiplier=cosine_to_zero)
    trainer._set_hyperparameters(5)
    assert muon.param_groups[0]["weight_decay"] == pytest.approx(0.15)
    assert all(g["weight_decay"] == 0.01 for g in adamw.param_groups)  # AdamW's decay is not scheduled
    trainer.weight_decay_multiplier = None
    trainer._set_hyperparameters(5)
    assert muon.param_groups[0]["weight_decay"] == 0.3
