"""KV cache: incremental decoding reproduces the full forward; expand; GQA; bounds."""

from __future__ import annotations

import pytest
import torch

from picochat.model import GPT, GPTConfig, KVCache, build_model

VOCAB = 97


def model_for(n_kv_head: int) -> GPT:
    config = GPTConfig(vocab_size=VOCAB, n_layer=3, n_head=4, n_kv_head=n_kv_head, n_embd=32, sequence_len=32)
    torch.manual_seed(0)
    model = build_model(config, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def cache_for(model: GPT, batch_size: int, max_len: int = 32) -> KVCache:
    c = model.config
    return KVCache(batch_size, c.n_layer, c.n_kv_head, c.head_dim, max_len, "cpu", torch.float32)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
@torch.no_grad()
def test_prefill_then_one_token_at_a_time_matches_full_forward(n_kv_head: int) -> None:
    model = model_for(n_kv_head)
    idx = torch.randint(0, VOCAB, (2, 12))
    full = model(idx)  # (2, 12, V)
    cache = cache_for(model, 2)
    steps = [model(idx[:, :5], kv_cache=cache)]
    assert cache.pos == 5
    for t in range(5, 12):
        steps.append(model(idx[:, t:t + 1], kv_cache=cache))
    assert cache.pos == 12
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


@torch.no_grad()
def test_chunked_prefill_on_a_non_empty_cache_uses_a_causal_mask() -> None:
    model = model_for(2)
    idx = torch.randint(0, VOCAB, (1, 14))
    full = model(idx)
    cache = cache_for(model, 1)
    parts = [model(idx[:, :4], kv_cache=cache), model(idx[:, 4:9], kv_cache=cache),
             model(idx[:, 9:10], kv_cache=cache), model(idx[:, 10:], kv_cache=cache)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)


@torch.no_grad()
def test_expand_copies_a_prefilled_row_into_many() -> None:
    model = model_for(2)
    prompt = torch.randint(0, VOCAB, (1, 6))
    cache = cache_for(model, 1, max_len=16)
    model(prompt, kv_cache=cache)
    wide = cache.expand(3)
    assert (wide.batch_size, wide.pos, wide.max_len) == (3, 6, 16)
    nxt = torch.tensor([[5], [17], [5]])
    out = model(nxt, kv_cache=wide)[:, -1]  # (3, V)
    for row in range(3):
        reference = model(torch.cat([prompt, nxt[row:row + 1]], dim=1))[:, -1]
        torch.testing.assert_close(out[row:row + 1], reference, rtol=0, atol=1e-5)
    assert cache.pos == 6  # the source cache is untouched
    with pytest.raises(ValueError, match="batch-1"):
        wide.expand(2)


def test_insert_returns_views_and_refuses_overflow() -> None:
    cache = KVCache(2, 1, 3, 4, max_len=5, device="cpu", dtype=torch.float32)
    k = torch.randn(2, 3, 3, 4)
    k_all, v_all = cache.insert(0, k, k + 1)
    assert k_all.shape == (2, 3, 3, 4) and torch.equal(k_all, k) and torch.equal(v_all, k + 1)
    assert cache.pos == 0  # only advance() moves it
    cache.advance(3)
    k_all, _ = cache.insert(0, torch.zeros(2, 3, 2, 4), torch.zeros(2, 3, 2, 4))
    assert k_all.shape == (2, 3, 5, 4) and torch.equal(k_all[:, :, :3], k)
    cache.advance(2)
    with pytest.raises(ValueError, match="max_len=5"):
        cache.insert(0, torch.zeros(2, 3, 1, 4), torch.zeros(2, 3, 1, 4))
    cache.reset()
    assert cache.pos == 0


@torch.no_grad()
def test_bf16_cache_under_autocast_decodes_close_to_fp32() -> None:
    model = model_for(2)
    idx = torch.randint(0, VOCAB, (1, 8))
    full = model(idx)
    c = model.config
    cache = KVCache(1, c.n_layer, c.n_kv_head, c.head_dim, 16, "cpu", torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        steps = [model(idx[:, :4], kv_cache=cache)] + [model(idx[:, t:t + 1], kv_cache=cache) for t in range(4, 8)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=0.15)
