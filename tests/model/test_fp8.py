"""FP8 training matmuls (picochat.model.fp8): the numbers, which layers convert, what stays untouched
(on a CPU, where torch._scaled_mm computes the same products slowly); base-train --fp8: tests/train."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from picochat.errors import ConfigError
from picochat.model import fp8
from picochat.model.gpt import GPTConfig, build_model


def rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t after fp8's rounding (scale, cast, unscale), in fp32."""
    q, inv = fp8.quantize(t, dtype)
    return q.float() * inv


def test_quantize_uses_the_whole_range_and_round_trips_closely():
    x = torch.randn(64, 128) * 3
    for dtype, rel in ((fp8.E4M3, 2 ** -4), (fp8.E5M2, 2 ** -3)):  # half an ulp of 3 / 2 mantissa bits
        q, inv = fp8.quantize(x, dtype)
        assert q.dtype == dtype
        assert q.float().abs().max() == torch.finfo(dtype).max  # the largest element maps to the top
        err = (q.float() * inv - x).abs() / x.abs().clamp(min=1e-3)
        assert err[x.abs() > 1e-2].max() <= rel * 1.001
    zero, inv = fp8.quantize(torch.zeros(16, 16), fp8.E4M3)  # no division by zero, no NaN
    assert torch.isfinite(inv) and not zero.float().any()


def test_float8_matmul_forward_and_backward_are_the_rounded_products():
    torch.manual_seed(0)
    x = torch.randn(32, 128, requires_grad=True)
    w = torch.randn(256, 128, requires_grad=True)
    g = torch.randn(32, 256)
    y = fp8._Float8Matmul.apply(x, w, torch.float32)
    torch.testing.assert_close(y, rounded(x, fp8.E4M3) @ rounded(w, fp8.E4M3).t(), rtol=1e-5, atol=1e-4)
    y.backward(g)
    g8 = rounded(g, fp8.E5M2)
    torch.testing.assert_close(x.grad, g8 @ rounded(w, fp8.E4M3), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(w.grad, g8.t() @ rounded(x, fp8.E4M3), rtol=1e-5, atol=1e-4)
    exact = x.detach() @ w.detach().t()  # and fp8 is close to, but not, the exact product
    rel = ((y - exact).norm() / exact.norm()).item()
    assert 1e-3 < rel < 0.06


def test_conversion_picks_the_block_matmuls_and_changes_no_weight():
    config = GPTConfig(vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=128, sequence_len=64)
    model = build_model(config, "cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = fp8.convert_to_fp8(model)
    assert sorted(names) == sorted(f"transformer.h.{i}.{n}" for i in range(2)
                                   for n in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc",
                                             "mlp.c_proj"))
    assert type(model.lm_head) is nn.Linear
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    small = nn.Linear(64, 128, bias=False)
    odd = nn.Linear(136, 200, bias=False)
    assert not fp8.eligible(small) and not fp8.eligible(odd) and fp8.eligible(nn.Linear(128, 512, bias=False))


def test_a_converted_layer_is_plain_outside_training():
    torch.manual_seed(1)
    layer = nn.Linear(128, 128, bias=False)
    plain = nn.Linear(128, 128, bias=False)
    plain.load_state_dict(layer.state_dict())
    layer.__class__ = fp8.Float8Linear
    x = torch.randn(2, 8, 128)
    assert not torch.equal(layer(x), plain(x))  # training with grad: fp8
    with torch.no_grad():
        assert torch.equal(layer(x), plain(x))
    layer.eval()
    assert torch.equal(layer(x), plain(x))
    layer.train()
    assert torch.equal(layer(x[:, :3]), plain(x[:, :3]))  # 6 rows: not a multiple of 16
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the compute dtype comes out, gradients in each input's
        xr = x.clone().requires_grad_()
        y = layer(xr)
        assert y.dtype == torch.bfloat16 and y.shape == (2, 8, 128)
        y.float().sum().backward()
    assert xr.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32


def test_the_decision(monkeypatch):
    cpu = torch.device("cpu")
    assert fp8.fp8_decision("off", cpu) is False
    assert fp8.fp8_decision("auto", cpu) is False  # no FP8 tensor cores
    assert fp8.fp8_decision("on", cpu) is True  # runs, for checks
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8.fp8_decision("auto", gpu) is True
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert fp8.fp8_decision("auto", gpu) is False
    with pytest.raises(ConfigError, match=r"--fp8 on: .*compute capability 8\.0.*--fp8 off or auto"):
        fp8.fp8_decision("on", gpu)
    with pytest.raises(ConfigError, match="--fp8 'yes'"):
        fp8.fp8_decision("yes", cpu)


def test_a_transposed_gradient_still_gives_row_major_operands():
    torch.manual_seed(2)
    q, _ = fp8.quantize(torch.randn(128, 64).t(), fp8.E5M2)  # a gradient can arrive as a transposed view
    assert q.is_contiguous()
    x = torch.randn(16, 128, requires_grad=True)
    w = torch.randn(128, 128, requires_grad=True)
    fp8._Float8Matmul.apply(x, w, torch.float32).backward(torch.randn(128, 16).t())
    assert x.grad.shape == x.shape and w.grad.shape == w.shape
