"""DecodeStep: the lean one-token step equals the model's own forward, with and without GQA."""

import pytest
import torch

from picochat.infer.decode import DecodeStep
from picochat.model.gpt import GPTConfig, build_model
from picochat.model.kv_cache import KVCache


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_decode_step_equals_hidden_states(n_kv_head, matmul_kernel):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=97, n_layer=3, n_head=4, n_kv_head=n_kv_head, n_embd=64, sequence_len=8)
    model = build_model(config, "cpu").eval()
    with torch.no_grad():  # non-zero output projections, so every layer matters
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(std=0.1)
            block.mlp.c_proj.weight.normal_(std=0.1)
    assert DecodeStep.supports(model, torch.float32)
    step = DecodeStep(model)
    B, prompt_len, new = 3, 5, 9  # runs past sequence_len: the rotary tables must grow
    ids = torch.randint(0, 97, (B, prompt_len + new))
    ref_cache = KVCache(B, 3, n_kv_head, 16, prompt_len + new)
    fast_cache = KVCache(B, 3, n_kv_head, 16, prompt_len + new)
    with torch.inference_mode():
        model.hidden_states(ids[:, :prompt_len], kv_cache=ref_cache)
        model.hidden_states(ids[:, :prompt_len], kv_cache=fast_cache)
        for t in range(prompt_len, prompt_len + new):
            expected = model.hidden_states(ids[:, t:t + 1], kv_cache=ref_cache)[:, -1]
            got = step(ids[:, t:t + 1], fast_cache)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            assert fast_cache.pos == ref_cache.pos == t + 1
        torch.testing.assert_close(fast_cache.k, ref_cache.k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast_cache.v, ref_cache.v, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="KV cache overflow"):
            step(ids[:, :1], fast_cache)


def test_decode_step_is_only_used_where_it_is_faster():
    model = build_model(GPTConfig(vocab_size=32, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, sequence_len=8), "cpu")
    assert not DecodeStep.supports(model, torch.bfloat16)
    assert not DecodeStep.supports(torch.nn.Linear(2, 2), torch.float32)


def test_large_models_skip_the_copies(monkeypatch):
    import picochat.infer.decode as decode_module
    import picochat.infer.unembed as unembed_module
    from picochat.infer.unembed import Unembedder

    model = build_model(GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, sequence_len=8), "cpu")
    assert DecodeStep.supports(model, torch.float32)
    monkeypatch.setattr(decode_module, "MAX_COPY_BYTES", 1000)
    assert not DecodeStep.supports(model, torch.float32)
    monkeypatch.setattr(unembed_module, "MAX_COPY_BYTES", 1000)
    unembed = Unembedder(model.lm_head.weight, torch.float32)
    for rows in (1, 1, 1, 4):
        hidden = torch.randn(rows, 32)
        torch.testing.assert_close(unembed(hidden), hidden @ model.lm_head.weight.t(), atol=1e-5, rtol=1e-5)
    assert unembed.transposed is None and unembed.packed is None
