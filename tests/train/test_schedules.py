import itertools

import pytest

from picochat.train.schedules import (
    constant_then_linear_to_zero,
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
