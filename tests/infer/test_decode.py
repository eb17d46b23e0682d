"""DecodeStep: the lean one-token step equals the model's own forward, with and without GQA,
and with each architecture option alone and all of them together."""

import pytest
import torch

from picochat.infer.decode import DecodeStep
from picochat.model.gpt import GPTConfig, build_model
from picochat.model.kv_cache import KVCache
from tests.model.options import LONG, OPTIONS, options_config, randomize

# (n_head, n_kv_head, n_embd): MHA, GQA, MQA and head dims 8 / 16 / 32
SHAPES = [(4, 4, 64), (4, 2, 64), (4, 1, 64), (2, 1, 64), (8, 2, 64), (3, 3, 48)]
# bf16: the step's products are exact and its sums are fp32, like a bf16 GEMM's, but its attention
# runs in fp32 (forward's in bf16), so some values round to a neighbouring bf16 value (1 ulp =
# 2^-8 relative) and such differences travel through the later layers: a few elements differ by a
# few ulps, the mean difference stays far smaller (checked too).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 6e-2}
MEAN_TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n_head,n_kv_head,n_embd", SHAPES)
def test_decode_step_equals_hidden_states(n_head, n_kv_head, n_embd, dtype, matmul_kernel):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=97, n_layer=3, n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd, sequence_len=8)
    # runs past sequence_len: the rotary tables must grow
    check_decode_equals_hidden_states(randomize(build_model(config, "cpu").eval()), dtype, prompt_len=5, new=9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n_kv_head", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("option", OPTIONS)
def test_decode_step_equals_hidden_states_with_options(option, n_kv_head, dtype, matmul_kernel):
    torch.manual_seed(0)
    config = options_config(OPTIONS[option], n_kv_head=n_kv_head)
    # windowed: the prompt already reaches past the short window, decoding slides it along
    prompt_len = LONG if config.sequence_len > 32 else 5
    check_decode_equals_hidden_states(randomize(build_model(config, "cpu").eval()), dtype, prompt_len, new=9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["classic", "all_2026"])
def test_the_step_on_the_models_own_weights_equals_hidden_states(arch, dtype):
    """Without copies (a GPU, or a model too large to copy; continuous batching runs it there) the
    step reads the model's parameters themselves and still computes what forward() computes."""
    torch.manual_seed(0)
    config = options_config(OPTIONS.get(arch, {}), n_kv_head=2)
    prompt_len = LONG if config.sequence_len > 32 else 5
    step = check_decode_equals_hidden_states(randomize(build_model(config, "cpu").eval()), dtype, prompt_len, new=9,
                                             copies=False)
    params = {p.data_ptr() for p in step.model.parameters()}
    linears = step.qkv + step.attn_proj + step.fc + step.mlp_proj
    assert all(w.data_ptr() in params for linear in linears for w in linear.weights)


@pytest.mark.parametrize("per_row", [False, True], ids=["shared-position", "own-positions"])
def test_the_fused_bf16_layer_is_the_step_by_step_one(per_row, monkeypatch):
    """A bf16 step through the two fused kernel calls per layer (value embeddings, GQA and windows
    included) gives the same hidden states and cache, bit for bit, as the same step call by call."""
    from picochat.infer import cpu_matmul
    if not cpu_matmul.available():
        pytest.skip("the small-matmul C kernel is not built on this machine")
    torch.manual_seed(0)
    model = randomize(build_model(options_config(OPTIONS["all_2026"], n_kv_head=2), "cpu").eval())
    model.cast_weights_(torch.bfloat16)
    assert model.config.value_embed_layers()
    calls, real = [], cpu_matmul.decode_qkv

    def decode_qkv(*args):
        q = real(*args)
        calls.append((args[-2] is not None, q is not None))  # (a value embedding given, the kernel ran)
        return q
    monkeypatch.setattr(cpu_matmul, "decode_qkv", decode_qkv)
    ids = torch.randint(0, model.config.vocab_size, (3, 12))
    positions = torch.tensor([2, 7, 11]) if per_row else None
    outputs, caches = [], []
    for fused in (True, False):
        step = DecodeStep(model)
        assert step.fused
        step.fused = fused
        cache = KVCache(3, model.config.n_layer, 2, model.config.head_dim, 16)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = [step(ids[:, t:t + 1], cache, positions if per_row else None) for t in range(ids.size(1))]
        outputs.append(torch.stack(out))
        caches.append((cache.k.clone(), cache.v.clone()))
    assert set(calls) == {(True, True), (False, True)}  # layers with and without one, all in the kernel
    assert torch.equal(outputs[0], outputs[1])
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])


def check_decode_equals_hidden_states(model, dtype: torch.dtype, prompt_len: int, new: int,
                                      copies: bool | None = None) -> DecodeStep:
    """Prefill `prompt_len` tokens, then `new` one at a time through hidden_states and DecodeStep."""
    config = model.config
    model.cast_weights_(dtype)
    assert DecodeStep.supports(model, dtype)
    step = DecodeStep(model, copies=copies)
    assert step.copies == (copies is not False)
    B, layers, n_kv_head, head_dim = 3, config.n_layer, config.n_kv_head, config.head_dim
    ids = torch.randint(0, config.vocab_size, (B, prompt_len + new))
    ref_cache = KVCache(B, layers, n_kv_head, head_dim, prompt_len + new, dtype=dtype)
    fast_cache = KVCache(B, layers, n_kv_head, head_dim, prompt_len + new)  # fp32: attention runs in fp32
    tol = TOLERANCE[dtype]
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        model.hidden_states(ids[:, :prompt_len], kv_cache=ref_cache)
        model.hidden_states(ids[:, :prompt_len], kv_cache=fast_cache)
        for t in range(prompt_len, prompt_len + new):
            expected = model.hidden_states(ids[:, t:t + 1], kv_cache=ref_cache)[:, -1]
            got = step(ids[:, t:t + 1], fast_cache)
            assert got.dtype == expected.dtype == torch.float32
            torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
            assert (got - expected).abs().mean() < MEAN_TOLERANCE[dtype]
            assert fast_cache.pos == ref_cache.pos == t + 1
        torch.testing.assert_close(fast_cache.k, ref_cache.k.float(), atol=tol, rtol=tol)
        torch.testing.assert_close(fast_cache.v, ref_cache.v.float(), atol=tol, rtol=tol)
        with pytest.raises(ValueError, match="KV cache overflow"):
            step(ids[:, :1], fast_cache)
    return step


def test_decode_step_is_only_used_where_it_is_faster():
    model = build_model(GPTConfig(vocab_size=32, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, sequence_len=8), "cpu")
    assert DecodeStep.supports(model, torch.float32) and DecodeStep.supports(model, torch.bfloat16)
    assert not DecodeStep.supports(model, torch.float16)
    assert not DecodeStep.supports(torch.nn.Linear(2, 2), torch.float32)
    assert DecodeStep.runs(model, torch.bfloat16) and not DecodeStep.runs(model, torch.float16)
    assert not DecodeStep.runs(torch.nn.Linear(2, 2), torch.float32)


def test_large_models_skip_the_copies(monkeypatch):
    import picochat.infer.decode as decode_module
    import picochat.infer.unembed as unembed_module
    from picochat.infer.unembed import Unembedder

    model = build_model(GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, sequence_len=8), "cpu")
    assert DecodeStep.supports(model, torch.float32)
    monkeypatch.setattr(decode_module, "MAX_COPY_BYTES", 1000)
    assert not DecodeStep.supports(model, torch.float32)
    assert DecodeStep.runs(model, torch.float32) and not DecodeStep(model).copies
    monkeypatch.setattr(unembed_module, "MAX_COPY_BYTES", 1000)
    unembed = Unembedder(model.lm_head.weight, torch.float32)
    for rows in (1, 1, 1, 4):
        hidden = torch.randn(rows, 32)
        torch.testing.assert_close(unembed(hidden), hidden @ model.lm_head.weight.t(), atol=1e-5, rtol=1e-5)
    assert unembed.transposed is None and unembed.packed is None


def test_the_step_norms_its_rows_in_the_kernel(matmul_kernel, monkeypatch):
    """torch runs an RMSNorm as ~8 small ops: with the C kernel, every norm of the step (the
    embedding's, the blocks' inputs, queries and keys, the final one) goes through it instead."""
    import torch.nn.functional as F

    calls = []
    real = F.rms_norm
    monkeypatch.setattr(F, "rms_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = build_model(GPTConfig(vocab_size=64, n_layer=3, n_head=2, n_kv_head=2, n_embd=32, sequence_len=8), "cpu")
    cache = KVCache(1, 3, 2, 16, 8)
    with torch.inference_mode():
        DecodeStep(model)(torch.tensor([[5]]), cache)
    assert len(calls) == (0 if matmul_kernel else 2 + 3 * 3)
