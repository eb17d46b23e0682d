"""Decode-time unembedding (raw logits in the fastest layout) and the sampler's deferred softcap."""

import torch
import torch.nn.functional as F

from picochat.infer import Engine
from picochat.infer.sampling import capped, sample_next
from picochat.infer.unembed import Unembedder


def test_raw_logits_equal_the_linear_layer_in_every_layout(matmul_kernel):
    torch.manual_seed(0)
    weight = torch.randn(1000, 48)
    unembed = Unembedder(weight, torch.float32)
    # the first call reads the weight as it is; the 2nd makes the kernel's packed copy (used up
    # to 16 rows), or without the kernel the 2nd batch-1 call the transposed copy
    for rows in (1, 1, 1, 2, 3, 8, 17, 1):
        hidden = torch.randn(rows, 48)
        got = unembed(hidden)
        assert got.shape == (rows, 1000) and got.is_contiguous()
        torch.testing.assert_close(got, F.linear(hidden, weight), atol=1e-4, rtol=1e-4)
    assert (unembed.packed is not None) == matmul_kernel
    assert (unembed.transposed is not None) == (not matmul_kernel)


def test_bf16_logits_are_fp32_sums_of_the_rounded_values_under_autocast(matmul_kernel):
    """bf16 weights, called inside the engine's bf16 autocast: the logits are the fp32 sums of the exact
    bf16 products in every layout, not a bf16 GEMM's logits rounded to bf16 (in steps of 1/32 at 8-16)."""
    torch.manual_seed(0)
    weight = (torch.randn(1000, 48) * 3).bfloat16()
    unembed = Unembedder(weight, torch.bfloat16)
    for rows in (1, 1, 1, 3, 17):
        hidden = torch.randn(rows, 48)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = unembed(hidden)
        want = hidden.bfloat16().float() @ weight.float().t()
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
        assert not torch.equal(got, got.bfloat16().float())  # not rounded to bf16 on the way


def test_each_generation_sees_the_current_weights(tokenizer, model):
    """The engine makes a new Unembedder per request: an optimiser step in between is seen."""
    engine = Engine(model, tokenizer, compute_dtype=torch.float32)
    prompt = tokenizer.encode("Hello there", prepend="<|bos|>")
    before, _ = engine.generate_batch(prompt, max_tokens=12, temperature=0.0, use_tools=False)
    original = model.lm_head.weight.detach().clone()
    try:
        with torch.no_grad():
            model.lm_head.weight[before[0][5]] *= -100.0  # its (winning, positive) logit turns very negative
        after, _ = engine.generate_batch(prompt, max_tokens=12, temperature=0.0, use_tools=False)
    finally:
        with torch.no_grad():
            model.lm_head.weight.copy_(original)
    assert after[0][:5] == before[0][:5] and after[0][5] != before[0][5]


def test_deferred_softcap_draws_exactly_what_capping_first_draws():
    torch.manual_seed(0)
    # Up to ~3x the cap, where capping changes the distribution a lot (fp32 tanh rounds to exactly
    # 1 only beyond ~9x; there capping first makes ties that the raw logits break).
    raw = torch.randn(5, 4000) * 10
    cap = 15.0
    for kwargs in ({"temperature": 0.0}, {"temperature": 0.8, "top_k": 50}, {"temperature": 1.2, "top_k": 7, "top_p": 0.9},
                   {"temperature": 1.0, "top_p": 0.8}, {"temperature": 0.7}):
        for seed in range(3):
            deferred = sample_next(raw, torch.Generator().manual_seed(seed), softcap=cap, **kwargs)
            first = sample_next(capped(raw, cap), torch.Generator().manual_seed(seed), **kwargs)
            assert torch.equal(deferred, first), kwargs
