"""The GPT: config from depth, shapes, losses, init, FLOPs, rotary convention, bf16 autocast."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from picochat import kernels
from picochat.errors import ConfigError
from picochat.model import GPT, GPTConfig, build_model, fused_ce
from picochat.model.gpt import _softcap_cross_entropy_chunks, apply_rotary

VOCAB = 100  # deliberately not a multiple of 64 (nor of the kernel's 8 or 16 lanes)


@pytest.fixture(autouse=True, params=["fused-kernel", "torch-ops"])
def elementwise(request, monkeypatch) -> str:
    """Every test here runs with the loss's C kernel and again with torch's ops only (as on a
    machine without a C compiler). Where there is a compiler, the kernel must build."""
    if request.param == "fused-kernel":
        if kernels.compiler() is None:
            pytest.skip("no C compiler on this machine: the kernel cannot be built")
        assert fused_ce.available(), "softcap_ce.c did not build or failed its check; see picochat/model/fused_ce.py"
    else:
        monkeypatch.setattr(fused_ce, "available", lambda: False)
    return request.param


def test_the_fused_kernel_equals_float64_torch_in_both_dtypes(elementwise) -> None:
    if elementwise != "fused-kernel":
        pytest.skip("a test of the kernel itself")
    g = torch.Generator().manual_seed(3)
    a = torch.randn(7, 1001, generator=g) * 5  # rows of a vocabulary that is not a multiple of 8
    targets = torch.randint(0, 1001, (7,), generator=g)
    for dtype, shift in ((torch.float32, 15.0), (torch.float32, 0.0), (torch.bfloat16, 15.0)):
        chunk = a.to(dtype)
        loss_ref, sum_ref, g_ref = fused_ce.reference_rows(chunk.float(), targets, 15.0, shift)
        for want_grad in (False, True):
            work = chunk.clone()
            loss, sum_exp = fused_ce.softcap_ce_rows(work, targets, 15.0, shift, want_grad)
            torch.testing.assert_close(loss.double(), loss_ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(sum_exp.double(), sum_ref, rtol=1e-5, atol=0)
            scale = sum_ref[:, None]  # the loss divides g by the row's sum
            if want_grad:
                tol = 1e-6 if dtype == torch.float32 else 4e-3  # bf16: g is rounded to bf16
                torch.testing.assert_close(work.double() / scale, g_ref / scale, rtol=tol, atol=tol)
            else:
                assert torch.equal(work, chunk)  # no gradient asked: the chunk is left alone


def test_add_into_equals_torch_add_bit_for_bit() -> None:
    """acc (fp32) += src (bf16): the widening is exact and there is one rounding per element, as in torch."""
    g = torch.Generator().manual_seed(4)
    for numel in (1, 15, 16, 1001, 70_000):  # below, at and past a vector, and past the threaded size
        acc = torch.randn(numel, generator=g) * 100
        src = (torch.randn(numel, generator=g) * 1e-3).bfloat16()
        want = acc + src.float()
        fused_ce.add_into(acc, src)
        assert torch.equal(acc, want), numel
    acc, src = torch.zeros(4, 6), torch.ones(6, 4, dtype=torch.bfloat16).t()  # not contiguous: torch's add_
    fused_ce.add_into(acc, src)
    assert torch.equal(acc, torch.ones(4, 6))


def test_compiled_for_training_on_a_cpu_keeps_the_fused_loss(monkeypatch) -> None:
    """Only the trunk goes through torch.compile on a CPU; the loss stays the chunked one (the compiled
    whole model would take the plain loss). Same loss and gradients as the eager model."""
    from picochat.model import gpt

    config = small_config()
    eager, compiled = trained_looking_model(config), trained_looking_model(config)
    chunked = []
    original = gpt._softcap_cross_entropy_chunks
    monkeypatch.setattr(gpt, "_softcap_cross_entropy_chunks", lambda *a, **k: chunked.append(1) or original(*a, **k))
    torch._dynamo.reset()
    step = gpt.compiled_for_training(compiled, backend="eager", dynamic=False)
    x = torch.randint(0, VOCAB, (2, 16))
    y = torch.randint(0, VOCAB, (2, 16))
    for reduction in ("mean", "sum"):
        eager.zero_grad()
        compiled.zero_grad()
        want = eager(x, y, loss_reduction=reduction)
        want.backward()
        chunked.clear()
        got = step(x, y, loss_reduction=reduction)
        got.backward()
        assert chunked, "the compiled step took the plain loss"
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        for (name, p), q in zip(compiled.named_parameters(), eager.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    with pytest.raises(ValueError, match="loss_reduction"):
        step(x, y, loss_reduction="avg")


def small_config(**overrides) -> GPTConfig:
    fields = {"vocab_size": VOCAB, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32, "sequence_len": 16}
    fields.update(overrides)
    return GPTConfig(**fields)


def trained_looking_model(config: GPTConfig, seed: int = 0) -> GPT:
    """A model whose output projections are not zero, so every path carries signal."""
    torch.manual_seed(seed)
    model = build_model(config, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def batch(config: GPTConfig, B: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, config.vocab_size, (B, config.sequence_len), generator=g)
    targets = torch.randint(0, config.vocab_size, (B, config.sequence_len), generator=g)
    return idx, targets


def test_from_depth_rounds_width_up_to_head_dim() -> None:
    c = GPTConfig.from_depth(4, 32768, aspect_ratio=64, head_dim=64, max_seq_len=256)
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim) == (4, 256, 4, 4, 64)
    c = GPTConfig.from_depth(3, 1000, aspect_ratio=64, head_dim=128)
    assert (c.n_embd, c.n_head, c.sequence_len) == (256, 2, 2048)  # 192 rounded up to 256
    c = GPTConfig.from_depth(20, 65536, n_kv_head=2)
    assert (c.n_embd, c.n_head, c.n_kv_head) == (1280, 10, 2)


def test_config_round_trips_through_json_and_rejects_bad_values() -> None:
    c = small_config(softcap=20.0)
    assert GPTConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ConfigError, match="unknown fields"):
        GPTConfig.from_dict({**c.to_dict(), "window": 3})
    with pytest.raises(ConfigError, match="n_kv_head"):
        small_config(n_kv_head=3)
    with pytest.raises(ConfigError, match="n_head"):
        small_config(n_embd=30)
    with pytest.raises(ConfigError, match="depth"):
        GPTConfig.from_depth(0, 100)


@pytest.mark.parametrize("field, value, message", [
    ("n_layer", "twelve", "n_layer='twelve' must be an integer"),
    ("n_head", "4", "n_head='4' must be an integer"),
    ("n_layer", 2.5, "n_layer=2.5 must be an integer"),
    ("value_embeds", "false", "value_embeds='false' must be true or false"),
    ("window_pattern", 5, "window_pattern=5 must be a string"),
    ("softcap", "15", "softcap='15' must be a number"),
    ("qk_scale", float("nan"), "qk_scale=nan must be a finite number"),
    ("rope_theta", 0.0, "rope_theta=0.0 must be > 0"),
    ("rope_theta", -10000.0, "rope_theta=-10000.0 must be > 0"),
    ("norm_eps", -1.0, "norm_eps=-1.0 must be > 0"),  # RMSNorm would take the root of a negative number: NaN
    ("norm_eps", 0.0, "norm_eps=0.0 must be > 0"),
])
def test_a_config_json_with_ill_typed_or_impossible_fields_is_a_config_error(field, value, message) -> None:
    saved = {**small_config().to_dict(), field: value}
    with pytest.raises(ConfigError, match=f"^model config: {message}"):
        GPTConfig.from_dict(saved)
    with pytest.raises(ConfigError, match="must be a JSON object"):
        GPTConfig.from_dict([saved])
    assert GPTConfig.from_dict({**saved, field: small_config().to_dict()[field]}) == small_config()


def test_state_dict_names_and_shapes() -> None:
    model = build_model(small_config(), "cpu")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {"transformer.wte.weight": (VOCAB, 32), "lm_head.weight": (VOCAB, 32)}
    for i in range(2):
        expected.update({
            f"transformer.h.{i}.attn.c_q.weight": (32, 32), f"transformer.h.{i}.attn.c_k.weight": (16, 32),
            f"transformer.h.{i}.attn.c_v.weight": (16, 32), f"transformer.h.{i}.attn.c_proj.weight": (32, 32),
            f"transformer.h.{i}.mlp.c_fc.weight": (128, 32), f"transformer.h.{i}.mlp.c_proj.weight": (32, 128),
        })
    assert shapes == expected


def test_logits_shape_dtype_and_softcap() -> None:
    config = small_config(softcap=2.0)
    model = trained_looking_model(config)
    idx, _ = batch(config)
    logits = model(idx)
    assert logits.shape == (3, 16, VOCAB) and logits.dtype == torch.float32
    assert logits.abs().max() <= 2.0
    with torch.no_grad():
        model.lm_head.weight.mul_(1000.0)
    assert model(idx).abs().max() <= 2.0  # saturates instead of exceeding the cap


def test_mean_loss_ignores_minus_one_and_matches_manual_cross_entropy() -> None:
    config = small_config()
    model = trained_looking_model(config)
    idx, targets = batch(config)
    targets[0, :7] = -1
    targets[2, -3:] = -1
    logits = model(idx)
    valid = targets != -1
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    manual = -log_probs[valid].gather(1, targets[valid][:, None]).mean()
    assert model(idx, targets).item() == pytest.approx(manual.item(), rel=1e-5)
    assert model(idx, targets, loss_reduction="sum").item() == pytest.approx(
        manual.item() * valid.sum().item(), rel=1e-5)
    with torch.no_grad():  # the no-grad chunked path agrees too
        assert model(idx, targets).item() == pytest.approx(manual.item(), rel=1e-5)


def test_none_reduction_is_per_token_with_zero_where_ignored() -> None:
    config = small_config()
    model = trained_looking_model(config)
    idx, targets = batch(config)
    targets[1, ::2] = -1
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (3, 16)
    assert torch.all(per_token[targets == -1] == 0)
    reference = F.cross_entropy(model(idx).view(-1, VOCAB), targets.view(-1), ignore_index=-1,
                                reduction="none").view(3, 16)
    torch.testing.assert_close(per_token, reference)
    per_token.sum().backward()  # the graph path is differentiable
    assert model.lm_head.weight.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(model(idx, targets, loss_reduction="none"), reference)
    with pytest.raises(ValueError, match="loss_reduction"):
        model(idx, targets, loss_reduction="avg")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_loss_gradients_match_autograd_through_full_logits(reduction: str) -> None:
    config = small_config()
    model = trained_looking_model(config)
    idx, targets = batch(config)
    targets[0, :5] = -1
    model(idx, targets, loss_reduction=reduction).backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(idx)
    F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1), ignore_index=-1, reduction=reduction).backward()
    for name, p in model.named_parameters():
        # fp32 rounding in another summation order: errors scale with the gradient's magnitude
        atol = 1e-6 * max(1.0, p.grad.abs().max().item())
        torch.testing.assert_close(fused[name], p.grad, rtol=1e-4, atol=atol, msg=name)


def test_chunked_cross_entropy_over_many_chunks_and_sparse_targets() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 8, generator=g, requires_grad=True)
    w = torch.randn(50, 8, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (37,), generator=g)
    t[torch.rand(37, generator=g) < 0.6] = -1
    scale = (t != -1).float() * 0.5
    losses, grad_x, grad_w = _softcap_cross_entropy_chunks(x.detach(), w.detach(), t, 3.0, scale,
                                                           rows_per_chunk=4)
    logits = 3.0 * torch.tanh(x @ w.t() / 3.0)
    reference = F.cross_entropy(logits, t, ignore_index=-1, reduction="none")
    torch.testing.assert_close(losses, reference.detach())
    (reference * scale).sum().backward()
    torch.testing.assert_close(grad_x, x.grad)
    torch.testing.assert_close(grad_w, w.grad)


@pytest.mark.parametrize("softcap", [15.0, 60.0])  # 60: exp(2 cap) would overflow, the shift is subtracted
def test_chunked_cross_entropy_matches_float64_at_large_logits(softcap: float) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(3000, 16, generator=g, dtype=torch.float64) * 4).requires_grad_()  # logits up to ~cap
    t = torch.randint(0, 3000, (40,), generator=g)
    scale = torch.full((40,), 0.25, dtype=torch.float64)
    losses, grad_x, grad_w = _softcap_cross_entropy_chunks(x.detach().float(), w.detach().float(), t, softcap,
                                                           scale.float(), rows_per_chunk=16)
    logits = softcap * torch.tanh(x @ w.t() / softcap)
    reference = F.cross_entropy(logits, t, reduction="none")
    (reference * scale).sum().backward()
    assert torch.isfinite(losses).all()
    torch.testing.assert_close(losses.double(), reference.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad_x.double(), x.grad, rtol=1e-4, atol=1e-5 * x.grad.abs().max().item())
    torch.testing.assert_close(grad_w.double(), w.grad, rtol=1e-4, atol=1e-5 * w.grad.abs().max().item())


def test_all_ignored_targets_give_zero_loss_and_zero_grads() -> None:
    config = small_config()
    model = trained_looking_model(config)
    idx, _ = batch(config)
    targets = torch.full_like(idx, -1)
    loss = model(idx, targets)
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.all(p.grad == 0), name
    assert model(idx, targets, loss_reduction="sum").item() == 0.0
    assert torch.all(model(idx, targets, loss_reduction="none") == 0)


def test_meta_build_then_init_is_deterministic_given_the_seed() -> None:
    config = small_config()
    torch.manual_seed(123)
    a = build_model(config, "cpu").state_dict()
    torch.manual_seed(123)
    b = build_model(config, "cpu").state_dict()
    torch.manual_seed(124)
    c = build_model(config, "cpu").state_dict()
    for name in a:
        assert a[name].device.type == "cpu" and a[name].dtype == torch.float32
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    assert not torch.equal(a["transformer.wte.weight"], c["transformer.wte.weight"])


def test_init_statistics() -> None:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, sequence_len=8)
    model = build_model(config, "cpu")
    assert model.transformer.wte.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert model.lm_head.weight.std().item() == pytest.approx(0.001, rel=0.05)
    for block in model.transformer.h:
        assert torch.all(block.attn.c_proj.weight == 0) and torch.all(block.mlp.c_proj.weight == 0)
        for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
            assert linear.weight.abs().max() <= math.sqrt(3 / 64)
            assert linear.weight.std().item() == pytest.approx(1 / 8, rel=0.1)
    # fresh model: near-uniform predictions
    idx = torch.randint(0, 512, (2, 8))
    assert model(idx, idx).item() == pytest.approx(math.log(512), abs=0.05)


def test_flops_per_token_and_param_counts() -> None:
    config = small_config()
    model = build_model(config, "cpu")
    C, V, L, T = 32, VOCAB, 2, 16
    block = C * C + 2 * (16 * C) + C * C + 2 * (4 * C * C)  # q, k+v (2 kv heads of 8), proj, mlp
    assert model.num_params() == V * C + L * block + V * C
    assert model.num_scaling_params() == L * block + V * C
    assert model.flops_per_token() == 6 * (L * block + V * C) + 12 * L * C * T


def test_rotary_matches_the_rotate_half_convention() -> None:
    """q*cos + rotate_half(q)*sin with frequencies concatenated, as the NanoChat export expects."""
    config = small_config()
    model = build_model(config, "cpu")
    D, T = config.head_dim, config.sequence_len
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2).float() / D))
    freqs = torch.outer(torch.arange(T).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    q = torch.randn(2, 3, T, D)
    rotate_half = torch.cat((-q[..., D // 2:], q[..., :D // 2]), dim=-1)
    expected = q * emb.cos() + rotate_half * emb.sin()
    torch.testing.assert_close(apply_rotary(q, model.rotary_cos, model.rotary_sin), expected)


def test_rotary_table_grows_past_sequence_len() -> None:
    config = small_config(sequence_len=8)
    model = trained_looking_model(config)
    idx = torch.randint(0, VOCAB, (1, 20))
    logits = model(idx)
    assert logits.shape == (1, 20, VOCAB) and model.rotary_cos.size(0) >= 20
    torch.testing.assert_close(model(idx[:, :8]), logits[:, :8], rtol=1e-5, atol=1e-5)


def test_bf16_autocast_loss_stays_close_to_fp32() -> None:
    config = small_config()
    model = trained_looking_model(config)
    idx, targets = batch(config)
    loss32 = model(idx, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = model(idx, targets)
        logits16 = model(idx)
        loss16_graph = model(idx, targets, loss_reduction="none").mean()
    assert loss16.dtype == torch.float32 and logits16.dtype == torch.float32
    assert loss16.item() == pytest.approx(loss32.item(), rel=0.02)
    assert loss16_graph.item() == pytest.approx(loss32.item(), rel=0.02)
    loss16.backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("bad", [VOCAB, -100])  # a token of a larger vocabulary; another library's ignore index
def test_a_target_outside_the_vocabulary_is_an_error_not_a_wrong_loss(bad: int) -> None:
    config = small_config()
    model = trained_looking_model(config)
    idx, targets = batch(config)
    targets[1, 3] = bad
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises((ValueError, RuntimeError), match="out of bounds"):
            model(idx, targets)


@torch.no_grad()
def test_fp16_autocast_evaluates_the_loss_on_a_cpu() -> None:
    """Evaluation may run in fp16 (--dtype fp16): the loss then takes torch's ops, the kernel being fp32/bf16 only."""
    config = small_config()
    model = trained_looking_model(config)
    idx, targets = batch(config)
    reference = model(idx, targets, loss_reduction="none")
    with torch.autocast("cpu", dtype=torch.float16):
        per_token = model(idx, targets, loss_reduction="none")
    assert per_token.dtype == torch.float32
    torch.testing.assert_close(per_token, reference, rtol=0.02, atol=0.02)
