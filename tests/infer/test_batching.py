"""Continuous batching: rows at different positions in one decode step, and requests that come and
go while others decode, each getting exactly what Engine.generate gives it alone."""

import itertools
import threading

import pytest
import torch

import picochat.infer.decode as decode_module
from picochat.errors import UserError
from picochat.infer import Engine
from picochat.infer.batching import BatchingEngine
from picochat.infer.decode import DecodeStep
from picochat.infer.sampling import sample_many, sample_next
from picochat.model.gpt import GPTConfig, build_model
from picochat.model.kv_cache import KVCache
from tests.infer.tiny import tiny_model
from tests.model.options import LONG, OPTIONS, options_config, randomize


@pytest.mark.parametrize("arch", ["classic", "all_2026"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rows_at_their_own_positions_equal_each_row_alone(matmul_kernel, dtype, arch):
    torch.manual_seed(0)
    config = options_config(OPTIONS.get(arch, {}), n_layer=2)
    model = randomize(build_model(config, "cpu").eval())
    step = DecodeStep(model.cast_weights_(dtype))
    # with the options, the longer rows reach past the short window (128 keys back)
    lengths, new = ([3, 9, 5] if arch == "classic" else [3, LONG, LONG - 30]), 6
    max_len = max(lengths) + new + 5
    prompts = [torch.randint(0, 97, (1, n + new)) for n in lengths]
    shared = KVCache(4, 2, 2, 16, max_len)  # one spare row: the batch is the first rows
    solos = [KVCache(1, 2, 2, 16, max_len) for _ in lengths]  # fp32, as the engine keeps them for DecodeStep
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        for b, (ids, n) in enumerate(zip(prompts, lengths)):
            model.hidden_states(ids[:, :n], kv_cache=solos[b])
            shared.copy_rows(b, solos[b], 0, n)  # keys, values and (smear) embeddings
        for t in range(new):
            positions = torch.tensor([n + t for n in lengths])
            ids = torch.stack([p[0, n + t] for p, n in zip(prompts, lengths)]).view(-1, 1)
            got = step(ids, shared, positions)
            for b, (p, n) in enumerate(zip(prompts, lengths)):
                expected = step(p[:, n + t:n + t + 1], solos[b])  # the row alone
                torch.testing.assert_close(got[b:b + 1], expected, atol=1e-5, rtol=1e-5)
        assert shared.pos == 0  # per-row positions leave the shared counter alone
        for b, n in enumerate(lengths):
            torch.testing.assert_close(shared.k[:, b, :, :n + new], solos[b].k[:, 0, :, :n + new], atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="KV cache overflow"):
            step(ids, shared, torch.tensor([max_len - 1, max_len, 3]))


def test_batched_draws_equal_request_by_request_draws():
    """sample_many shares top-k / softcap / softmax / top-p across requests, draws per request."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 500, generator=generator) * 4
    recent = torch.randint(-1, 500, (3, 64), generator=generator)  # -1: a slot not filled yet
    settings = [(1, {"temperature": 0.0, "top_k": None}), (3, {"temperature": 0.8, "top_k": 50}),
                (2, {"temperature": 1.3, "top_k": 5, "top_p": 0.7}), (1, {"temperature": 1.0, "top_k": 499}),
                (1, {"temperature": 0.0, "top_k": None, "repetition_penalty": 3.0, "recent": recent[:1]}),
                (2, {"temperature": 0.7, "top_k": 50, "repetition_penalty": 1.2, "recent": recent[1:]})]
    def requests(seed):
        return [(n, {**s, "generator": torch.Generator().manual_seed(seed * 10 + i), "softcap": 15.0})
                for i, (n, s) in enumerate(settings)]

    for seed in range(5):
        alone, start = [], 0
        for n, sample in requests(seed):
            alone += sample_next(logits[start:start + n], **sample).tolist()
            start += n
        assert sample_many(logits, requests(seed)) == alone
    full = [(2, {"temperature": 1.0, "generator": torch.Generator().manual_seed(1)}),
            (5, {"temperature": 0.5, "top_k": 3, "generator": torch.Generator().manual_seed(2)})]
    expected = sample_next(logits[:2], **full[0][1]).tolist()
    full[0][1]["generator"].manual_seed(1)
    assert sample_many(logits[:7], full)[:2] == expected  # a full-vocabulary request: request by request


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 1e-6])
def test_a_tiny_temperature_draws_the_argmax_not_nan(temperature):
    """Logits divided by 1e-40 overflow to inf and the softmax to NaN (multinomial then raised, and in a
    batch every request sharing the step failed): below GREEDY_BELOW a draw is greedy."""
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(1)) * 5
    best = logits.argmax(dim=-1).tolist()
    for top_k, top_p in ((None, None), (None, 0.9), (20, None), (20, 0.5)):
        sample = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "softcap": 15.0}
        assert sample_next(logits, torch.Generator().manual_seed(0), **sample).tolist() == best
        mixed = [(2, {**sample, "generator": torch.Generator().manual_seed(0)}),
                 (2, {"temperature": 0.8, "top_k": 20, "generator": torch.Generator().manual_seed(3)})]
        assert sample_many(logits, mixed)[:2] == best[:2]


def _alone(engine, prompt, **kwargs):
    return [(list(col), list(masks)) for col, masks in engine.generate(prompt, **kwargs)]


def _collect(batcher, prompt, results, key, **kwargs):
    results[key] = [(list(col), list(masks)) for col, masks in batcher.generate(prompt, **kwargs)]


REQUESTS = {  # prompt text, generate() arguments
    "greedy": ("Hello there! How are", {"max_tokens": 30, "temperature": 0.0}),
    "sampled": ("The quick brown fox", {"max_tokens": 25, "temperature": 1.0, "top_k": 20, "seed": 7}),
    "three": ("Numbers like 12 and", {"num_samples": 3, "max_tokens": 20, "temperature": 0.9, "top_k": 50,
                                      "seed": 3}),
    "nucleus": ("I am fine", {"max_tokens": 24, "temperature": 0.7, "top_k": 8, "top_p": 0.9, "seed": 11}),
    "full": ("Hello", {"max_tokens": 6, "temperature": 1.0, "seed": 5}),  # whole vocabulary: drawn on its own
    # the chat default's penalty, greedy and sampled: applied per request within the shared top-k
    "penalized": ("Hello there! How are", {"max_tokens": 30, "temperature": 0.0, "repetition_penalty": 1.5}),
    "penalized_two": ("The quick brown fox", {"num_samples": 2, "max_tokens": 25, "temperature": 0.7, "top_k": 50,
                                              "seed": 9, "repetition_penalty": 1.2}),
    # ~155 tokens: past the short attention window of the all_2026 model (sequence_len 256)
    "long": ("Numbers like 12 and 345 add up: 12 + 345 = 357. " * 5, {"max_tokens": 12, "temperature": 0.0}),
}


@pytest.mark.parametrize("arch", ["classic", "all_2026"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_concurrent_requests_get_what_they_get_alone(tokenizer, model, matmul_kernel, dtype, arch):
    if dtype == torch.bfloat16 and not matmul_kernel:
        pytest.skip("without the C kernel, torch's GEMMs sum a row in an order that depends on the batch's "
                    "size; rounded to bf16 that changes tokens (the kernel's rows are independent)")
    _check_concurrent_requests(tokenizer, model, dtype, arch)


@pytest.mark.parametrize("arch", ["classic", "all_2026"])
def test_a_model_too_large_to_copy_batches_on_its_own_weights(tokenizer, model, arch, monkeypatch):
    """Where the engine decodes through forward() (a GPU, or blocks over MAX_COPY_BYTES), the batch
    steps on the model's own weights, and each request still gets what it gets alone (fp32)."""
    monkeypatch.setattr(decode_module, "MAX_COPY_BYTES", 0)
    made, real = [], decode_module._ModelLinear
    monkeypatch.setattr(decode_module, "_ModelLinear", lambda *w: made.append(w) or real(*w))
    engine = _check_concurrent_requests(tokenizer, model, torch.float32, arch)
    assert not engine.lean_decode and BatchingEngine.supports(engine)
    assert len(made) == 4 * engine.config.n_layer  # qkv, attention out, MLP in and out, per layer


def _check_concurrent_requests(tokenizer, model, dtype: torch.dtype, arch: str) -> Engine:
    if arch != "classic":
        model = tiny_model(tokenizer.vocab_size, sequence_len=256, **OPTIONS[arch])
    engine = Engine(model.cast_weights_(dtype), tokenizer, compute_dtype=dtype)
    batcher = BatchingEngine(engine, max_rows=6)  # fewer rows than the requests need at once: some wait
    prompts = {k: tokenizer.encode(text, prepend="<|bos|>") for k, (text, _) in REQUESTS.items()}
    expected = {k: _alone(engine, prompts[k], use_tools=False, **kw) for k, (_, kw) in REQUESTS.items()}
    results: dict = {}
    try:
        # one request first, then the rest while it decodes
        first = batcher.generate(prompts["greedy"], use_tools=False, **REQUESTS["greedy"][1])
        head = [next(first), next(first)]
        threads = [threading.Thread(target=_collect, args=(batcher, prompts[k], results, k),
                                    kwargs={"use_tools": False, **kw}) for k, (_, kw) in REQUESTS.items() if k != "greedy"]
        for t in threads:
            t.start()
        results["greedy"] = [(list(c), list(m)) for c, m in head + list(first)]
        for t in threads:
            t.join(timeout=60)
    finally:
        batcher.close()
    for key in REQUESTS:
        assert results[key] == expected[key], key
    assert len(results["three"][0][0]) == 3
    # a random model may stop early; the long prompt decodes past the short window with the options
    assert len(results["greedy"]) == 30 if arch == "classic" else len(results["long"]) > 1
    return engine


def test_an_abandoned_request_frees_its_rows(tokenizer, model):
    engine = Engine(model, tokenizer, compute_dtype=torch.float32)
    engine.stop_tokens = set()  # decode the full length
    batcher = BatchingEngine(engine, max_rows=2)
    prompt = tokenizer.encode("Hello there", prepend="<|bos|>")
    try:
        left = batcher.generate(prompt, num_samples=2, max_tokens=40, temperature=0.0)
        next(left)
        left.close()  # the client went away: both rows are freed at the next step
        kept = _alone(batcher, prompt, num_samples=2, max_tokens=10, temperature=0.0)  # needs both rows
        assert kept == _alone(engine, prompt, num_samples=2, max_tokens=10, temperature=0.0)
        assert batcher._slots == [] or all(not s.request.rows for s in batcher._slots)
    finally:
        batcher.close()


def test_requests_are_checked_before_they_queue(tokenizer, model):
    batcher = BatchingEngine(Engine(model, tokenizer, compute_dtype=torch.float32), max_rows=2)
    with pytest.raises(UserError, match=r"num_samples must be in \[1, 2\]"):
        next(batcher.generate([1, 2], num_samples=3))
    with pytest.raises(UserError, match="not an id"):
        next(batcher.generate([10**6]))
    batcher.close()


def test_a_gpt_in_fp32_or_bf16_batches(tokenizer, model):
    assert BatchingEngine.supports(Engine(model, tokenizer, compute_dtype=torch.float32))
    assert BatchingEngine.supports(Engine(model, tokenizer, compute_dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="a picochat GPT computing in fp32 or bf16"):
        BatchingEngine(Engine(model, tokenizer, compute_dtype=torch.float16))


def bigram_gpt(tokenizer, next_token: dict[int, int]):
    """A real GPT whose greedy next token depends only on the current one: every block's output
    projection is zero, so the final hidden state is the normed embedding, and token a's
    embedding is a unit direction that the lm_head maps to next_token[a]."""
    config = GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, sequence_len=64)
    model = build_model(config, "cpu").eval()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        model.transformer.wte.weight.zero_()
        model.lm_head.weight.zero_()
        for i, (a, b) in enumerate(next_token.items()):
            model.transformer.wte.weight[a, i] = 1.0
            model.lm_head.weight[b, i] = 1.0
    return model


def test_tool_calls_are_forced_inside_a_batch(tokenizer):
    sp = tokenizer.encode_special
    done = tokenizer.encode("!")[0]
    chain = [sp("assistant_start"), sp("python_start"), *tokenizer.encode("6*7"), sp("python_end")]
    model = bigram_gpt(tokenizer, {**dict(itertools.pairwise(chain)), sp("output_end"): done, done: sp("assistant_end")})
    engine = Engine(model, tokenizer, compute_dtype=torch.float32)
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "what is 6*7?"}]})
    forced = [sp("output_start"), *tokenizer.encode("42"), sp("output_end")]
    expected = [*chain[1:], *forced, done, sp("assistant_end")]
    alone = _alone(engine, prompt, max_tokens=30, temperature=0.0)
    assert [col[0] for col, _ in alone] == expected  # the model really writes the call
    batcher = BatchingEngine(engine, max_rows=4)
    try:
        results: dict = {}
        threads = [threading.Thread(target=_collect, args=(batcher, prompt, results, i),
                                    kwargs={"num_samples": 2, "max_tokens": 30, "temperature": 0.0}) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        batcher.close()
    for i in range(2):
        assert [col for col, _ in results[i]] == [[t, t] for t in expected]
        assert [m[0] for _, m in results[i]] == [m[0] for _, m in alone]
        assert 0 in [m[0] for _, m in results[i]]  # forced tokens carry mask 0
