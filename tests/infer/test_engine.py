"""The engine against naive full-recompute generation, seeds, row dropping, tools and context limits."""

import itertools

import pytest
import torch

import picochat.infer.engine as engine_module
from picochat.errors import UserError
from picochat.infer import Engine
from picochat.infer.sampling import capped, keep_top_p, sample_many, sample_next
from tests.infer.tiny import tiny_model


def naive_greedy(model, prompt: list[int], max_tokens: int, stop: set[int], dtype=torch.float32) -> list[int]:
    """Recompute the whole sequence every step, no cache: the reference the engine must match
    (with the weights in `dtype` under autocast, as forward() runs in training and evaluation)."""
    ids = list(prompt)
    out = []
    model = model.with_weights_in(dtype)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        for _ in range(max_tokens):
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
            out.append(token)
            if token in stop:
                break
            ids.append(token)
    return out


def prompt_ids(tokenizer, text="Hello there! How are"):
    return tokenizer.encode(text, prepend="<|bos|>")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cast_at_load", [True, False], ids=["cast-at-load", "copy-per-generation"])
def test_greedy_equals_naive_generation(tokenizer, model, matmul_kernel, dtype, cast_at_load):
    stop = {tokenizer.encode_special("assistant_end"), tokenizer.bos_id}
    expected = naive_greedy(model, prompt_ids(tokenizer), 40, stop, dtype)
    if cast_at_load:
        model.cast_weights_(dtype)
    weights_before = model.lm_head.weight.clone()
    engine = Engine(model, tokenizer, compute_dtype=dtype)
    got = [col[0] for col, _ in engine.generate(prompt_ids(tokenizer), max_tokens=40, temperature=0.0,
                                                  use_tools=False)]
    assert engine.stop_tokens == stop and got == expected
    assert len(got) > 10
    # a model that keeps its fp32 master weights (RL) is left as it was
    assert torch.equal(model.lm_head.weight, weights_before)
    assert model.lm_head.weight.dtype == (dtype if cast_at_load else torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_matmuls_read_compute_dtype_weights_without_a_cast_per_token(tokenizer, model, dtype, matmul_kernel):
    """After the prefill, no op copies a weight-sized tensor into another dtype: every weight a
    decode step reads, the model's own or the step's copies (transposed, stacked), is already in
    the compute dtype (cast once at load), with the C kernel and with torch's matmuls alone."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model.cast_weights_(dtype)
    weight_size = model.config.n_embd ** 2  # the smallest block matrix; a decode step's activations are rows
    casts: list[tuple] = []

    class CastCounter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.to, torch.ops.aten.copy_):
                source = args[1] if func.overloadpacket is torch.ops.aten.copy_ else args[0]
                if (isinstance(source, torch.Tensor) and source.dim() == 2 and source.numel() >= weight_size
                        and out.dtype != source.dtype):
                    casts.append((func, tuple(source.shape), source.dtype))
            return out

    engine = Engine(model, tokenizer, compute_dtype=dtype)
    steps = engine.generate(prompt_ids(tokenizer), max_tokens=12, temperature=0.0, use_tools=False)
    next(steps)  # prefill and first token
    before = len(casts)
    with CastCounter():
        for _ in steps:
            pass
    assert casts[before:] == []
    # the check can fail: fp32 weights under a bf16 autocast are cast on every call
    if dtype == torch.bfloat16:
        fp32 = tiny_model(tokenizer.vocab_size)
        with CastCounter(), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            fp32.hidden_states(torch.tensor([prompt_ids(tokenizer)]))
        assert len(casts) > before


def test_greedy_samples_all_equal_the_single_greedy(tokenizer, model):
    engine = Engine(model, tokenizer, compute_dtype=torch.float32)
    prompt = prompt_ids(tokenizer)
    results, masks = engine.generate_batch(prompt, num_samples=3, max_tokens=20, temperature=0.0, use_tools=False)
    single, _ = engine.generate_batch(prompt, num_samples=1, max_tokens=20, temperature=0.0, use_tools=False)
    assert results == [single[0]] * 3
    assert all(m == [1] * len(single[0]) for m in masks)


def test_seed_reproducibility(tokenizer, model):
    engine = Engine(model, tokenizer)
    prompt = prompt_ids(tokenizer)
    kwargs = {"num_samples": 4, "max_tokens": 25, "temperature": 1.0, "top_k": 50, "top_p": 0.95}
    a, _ = engine.generate_batch(prompt, seed=123, **kwargs)
    b, _ = engine.generate_batch(prompt, seed=123, **kwargs)
    c, _ = engine.generate_batch(prompt, seed=124, **kwargs)
    assert a == b
    assert a != c
    assert len({tuple(r) for r in a}) > 1  # the samples of one request differ from each other


def test_top_k_one_is_greedy(tokenizer, model):
    engine = Engine(model, tokenizer)
    prompt = prompt_ids(tokenizer)
    greedy, _ = engine.generate_batch(prompt, max_tokens=15, temperature=0.0, use_tools=False)
    top1, _ = engine.generate_batch(prompt, max_tokens=15, temperature=1.5, top_k=1, seed=5, use_tools=False)
    assert top1 == greedy


@pytest.mark.parametrize("top_k", [None, 5], ids=["full-vocab", "top-k"])
def test_top_p_zero_keeps_the_most_likely_token(tokenizer, model, top_k):
    """top_p 0 keeps only the first token (keep_top_p: "the first token always stays"): greedy,
    not an all-zero distribution that multinomial refuses."""
    probs = torch.softmax(torch.tensor([[2.0, 1.0, 0.5, -1.0]]), dim=-1)
    assert keep_top_p(probs, 0.0)[0].tolist() == [probs[0, 0].item(), 0.0, 0.0, 0.0]
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    draw = sample_next(logits, torch.Generator().manual_seed(1), temperature=1.0, top_k=top_k, top_p=0.0)
    assert draw.tolist() == logits.argmax(dim=-1).tolist()
    sample = {"generator": torch.Generator().manual_seed(1), "temperature": 1.0, "top_k": top_k or 40, "top_p": 0.0}
    assert sample_many(logits, [(3, sample)]) == logits.argmax(dim=-1).tolist()

    engine = Engine(model, tokenizer)
    prompt = prompt_ids(tokenizer)
    greedy, _ = engine.generate_batch(prompt, max_tokens=10, temperature=0.0, use_tools=False)
    nucleus, _ = engine.generate_batch(prompt, max_tokens=10, temperature=1.0, top_k=top_k, top_p=0.0, seed=3,
                                       use_tools=False)
    assert nucleus == greedy


def test_finished_rows_are_dropped_and_the_rest_stay_exact(tokenizer, model, monkeypatch, matmul_kernel):
    """Every row's logits at every step equal a full recompute of that row's own history,
    also after other rows finished and were removed from the batch and the cache."""
    engine = Engine(model, tokenizer, compute_dtype=torch.float32)
    engine.stop_tokens = engine.stop_tokens | set(range(256, 300))  # frequent stops: rows end at different steps
    seen_logits = []
    real_sample_next = engine_module.sample_next

    def recording_sample_next(logits, **kwargs):
        # The engine hands over raw logits and the softcap; capped, they are what forward() gives.
        seen_logits.append(capped(logits, kwargs["softcap"]))
        return real_sample_next(logits, **kwargs)

    monkeypatch.setattr(engine_module, "sample_next", recording_sample_next)
    prompt = prompt_ids(tokenizer)
    columns = [col for col, _ in engine.generate(prompt, num_samples=6, max_tokens=30, temperature=1.0, seed=3)]
    batch_sizes = [logits.size(0) for logits in seen_logits]
    assert batch_sizes[0] == 6 and batch_sizes[-1] < 6, "some rows must finish early for this test"
    assert batch_sizes == sorted(batch_sizes, reverse=True)
    histories = [[] for _ in range(6)]
    with torch.no_grad():
        for step, column in enumerate(columns):
            live = [i for i, t in enumerate(column) if t is not None]
            assert len(live) == seen_logits[step].size(0)
            for r, i in enumerate(live):
                expected = model(torch.tensor([prompt + histories[i]]))[0, -1]
                torch.testing.assert_close(seen_logits[step][r], expected, atol=1e-4, rtol=1e-4)
                histories[i].append(column[i])


class ScriptedModel(torch.nn.Module):
    """A fake GPT whose next token is a fixed function of the last input token."""

    def __init__(self, vocab_size: int, next_token: dict[int, int], default: int):
        super().__init__()
        self.config = type("Config", (), {"vocab_size": vocab_size, "n_layer": 1, "n_head": 1, "n_kv_head": 1,
                                              "n_embd": 2, "sequence_len": 128})()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.next_token, self.default = next_token, default
        self.inputs: list[int] = []

    def forward(self, idx, kv_cache=None):
        B, T = idx.shape
        self.inputs.extend(idx[0].tolist())
        logits = torch.full((B, T, self.config.vocab_size), -10.0)
        for b in range(B):
            for t in range(T):
                logits[b, t, self.next_token.get(int(idx[b, t]), self.default)] = 10.0
        if kv_cache is not None:
            kv_cache.advance(T)
        return logits


def scripted_tool_model(tokenizer, expression: str):
    sp = tokenizer.encode_special
    expr_ids = tokenizer.encode(expression)
    done_id = tokenizer.encode("!")[0]
    chain = [sp("assistant_start"), sp("python_start"), *expr_ids, sp("python_end")]
    next_token = dict(itertools.pairwise(chain))
    next_token[sp("output_end")] = done_id
    next_token[done_id] = sp("assistant_end")
    junk = tokenizer.encode("z")[0]  # what the model "wants" while its tool output is being forced
    return ScriptedModel(tokenizer.vocab_size, next_token, default=junk), done_id


def test_tool_call_forces_the_calculator_result(tokenizer):
    model, done_id = scripted_tool_model(tokenizer, "6*7")
    engine = Engine(model, tokenizer)
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "what is 6*7?"}]})
    steps = list(engine.generate(prompt, max_tokens=30, temperature=0.0))
    tokens = [col[0] for col, _ in steps]
    masks = [m[0] for _, m in steps]
    sp = tokenizer.encode_special
    forced = [sp("output_start"), *tokenizer.encode("42"), sp("output_end")]
    expected = [sp("python_start"), *tokenizer.encode("6*7"), sp("python_end"), *forced, done_id, sp("assistant_end")]
    assert tokens == expected
    n_call = len(tokenizer.encode("6*7")) + 2
    assert masks == [1] * n_call + [0] * len(forced) + [1, 1]
    # The forced tokens were fed to the model, in order, before it wrote "!".
    fed = model.inputs[len(prompt):]
    assert fed[n_call:n_call + len(forced)] == forced


def test_refused_tool_call_forces_nothing(tokenizer):
    model, _ = scripted_tool_model(tokenizer, "__import__")
    engine = Engine(model, tokenizer)
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "hi"}]})
    results, masks = engine.generate_batch(prompt, max_tokens=20, temperature=0.0)
    assert tokenizer.encode_special("output_start") not in results[0]
    assert all(m == 1 for m in masks[0])


def test_tools_can_be_turned_off(tokenizer):
    model, _ = scripted_tool_model(tokenizer, "6*7")
    engine = Engine(model, tokenizer)
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "hi"}]})
    results, _masks = engine.generate_batch(prompt, max_tokens=12, temperature=0.0, use_tools=False)
    assert tokenizer.encode_special("output_start") not in results[0]


def test_prompt_longer_than_context_is_clipped_not_fatal(tokenizer):
    model = tiny_model(tokenizer.vocab_size, sequence_len=32)
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 30, prepend="<|bos|>")
    assert len(prompt) > 32
    results, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=100, temperature=1.0)
    assert all(1 <= len(r) for r in results)
    clipped, left = engine.fit_prompt(prompt, 100)
    assert clipped[0] == tokenizer.bos_id and len(clipped) == 31 and left == 1
    assert clipped[1:] == prompt[-30:]


def test_max_tokens_is_respected(tokenizer, model):
    engine = Engine(model, tokenizer)
    engine.stop_tokens = set()  # no row ends early: every row writes exactly max_tokens tokens
    for max_tokens in (1, 7):
        steps = list(engine.generate(prompt_ids(tokenizer), num_samples=2, max_tokens=max_tokens, temperature=1.0,
                                     seed=0, use_tools=False))
        assert len(steps) == max_tokens
        assert all(None not in column and masks == [1, 1] for column, masks in steps)
        results, _ = engine.generate_batch(prompt_ids(tokenizer), num_samples=2, max_tokens=max_tokens,
                                           temperature=1.0, seed=0, use_tools=False)
        assert [len(r) for r in results] == [max_tokens, max_tokens]


@pytest.mark.parametrize("bad", [[], [10**6], [-1], ["a"], "text"])
def test_bad_prompts_raise_user_errors(tokenizer, model, bad):
    engine = Engine(model, tokenizer)
    with pytest.raises(UserError):
        list(engine.generate(bad, max_tokens=3))


def test_bf16_cpu_prefills_are_padded_to_a_few_shapes(tokenizer, model):
    """bf16 prefills on the CPU are padded to PREFILL_BUCKET tokens (oneDNN caches a kernel per
    shape: every prompt length would grow the server's memory); the padding changes nothing."""
    from picochat.model.kv_cache import KVCache

    fp32 = Engine(model, tokenizer, compute_dtype=torch.float32)
    assert fp32.prefill_len(5) == 5
    model.cast_weights_(torch.bfloat16)
    engine = Engine(model, tokenizer, compute_dtype=torch.bfloat16)
    bucket = engine_module.PREFILL_BUCKET
    assert [engine.prefill_len(n) for n in (1, bucket, bucket + 1)] == [bucket, bucket, 2 * bucket]
    prompt = torch.tensor([prompt_ids(tokenizer)])
    cache = KVCache(1, 2, 1, 16, bucket, dtype=torch.float32)
    hidden = engine.prefill(model, prompt, cache)
    assert cache.pos == prompt.size(1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model.hidden_states(prompt)[:, -1]
    torch.testing.assert_close(hidden, expected, atol=0.05, rtol=0.05)


def test_draw_is_multinomials_draw_bit_for_bit_and_refuses_nan():
    """sampling.draw replaces torch.multinomial(probs, 1) on the CPU: the same index for the same generator
    state, over widths, batches, zero probabilities and column slices (the batched sampler's), and it
    consumes the generator as multinomial does; a NaN row raises, as multinomial does."""
    from picochat.infer.sampling import draw

    data = torch.Generator().manual_seed(0)
    ours, theirs = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for i in range(400):
        rows, width = 1 + i % 7, (1, 2, 7, 50, 300)[i % 5]
        probs = torch.softmax(torch.randn(rows, width + 3, generator=data) * (i % 4), dim=-1)
        probs = keep_top_p(probs, 0.8) if i % 3 == 0 else probs
        probs = probs[:, :width] if i % 2 else probs  # a slice of wider rows
        assert torch.equal(draw(probs, ours), torch.multinomial(probs, 1, generator=theirs))
    assert torch.equal(ours.get_state(), theirs.get_state())
    bad = torch.tensor([[0.5, 0.5], [float("nan"), float("nan")]])
    with pytest.raises(RuntimeError, match="NaN"):
        draw(bad, ours)
