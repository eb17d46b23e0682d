"""Log-probabilities from the engine (opt-in), prompt scoring, and rows the caller stops.

The reference for every log-prob is the model's own forward over the whole sequence: the
log-softmax of its softcapped logits, at temperature 1 whatever the sampling settings.
"""

import threading

import torch

from picochat.infer import Engine
from picochat.infer.batching import DONE, BatchingEngine


def forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(T-1, vocab): log p(token t+1 | tokens <= t) by one plain forward pass."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0, :-1].float(), dim=-1)


def check_entries(model, prompt: list[int], tokens: list[int], entries: list, top: int) -> None:
    reference = forward_logprobs(model, prompt + tokens)[len(prompt) - 1:]  # predicts tokens[0], tokens[1], ...
    for t, (token, (logprob, alternatives)) in enumerate(zip(tokens, entries, strict=True)):
        assert abs(logprob - reference[t, token].item()) < 1e-4
        values, ids = torch.topk(reference[t], top)
        assert [i for i, _ in alternatives] == ids.tolist()
        assert torch.allclose(torch.tensor([lp for _, lp in alternatives]), values, atol=1e-4)


def test_generated_tokens_carry_the_models_own_logprobs(tokenizer, model):
    engine = Engine(model, tokenizer, compute_dtype=torch.float32)
    prompt = tokenizer.encode("Hello there", prepend="bos")
    steps = list(engine.generate(prompt, num_samples=2, max_tokens=8, temperature=1.3, top_k=20, seed=4, logprobs=3))
    assert all(len(step) == 3 for step in steps)
    for i in range(2):
        tokens = [step[0][i] for step in steps if step[0][i] is not None]
        entries = [step[2][i] for step in steps if step[0][i] is not None]
        check_entries(model, prompt, tokens, entries, 3)
    # Without the opt-in the steps are unchanged pairs, and the draw is the same.
    plain = list(engine.generate(prompt, num_samples=2, max_tokens=8, temperature=1.3, top_k=20, seed=4))
    assert [s[0] for s in plain] == [s[0] for s in steps] and all(len(s) == 2 for s in plain)


def test_prompt_scoring_equals_the_forward_pass(tokenizer, model):
    engine = Engine(model, tokenizer, compute_dtype=torch.float32)
    ids = tokenizer.encode("The quick brown fox", prepend="bos")
    scored = engine.score(ids, top=2)
    assert scored[0] is None and len(scored) == len(ids)
    check_entries(model, ids[:1], ids[1:], scored[1:], 2)


def test_a_stopped_row_leaves_while_the_others_go_on(tokenizer, model):
    engine = Engine(model, tokenizer, compute_dtype=torch.float32)
    prompt = tokenizer.encode("Hi", prepend="bos")
    stopped: set[int] = set()
    columns = []
    for column, _ in engine.generate(prompt, num_samples=3, max_tokens=6, temperature=0.0, stopped=stopped):
        columns.append(column)
        if len(columns) == 2:
            stopped.add(1)  # as a stop string matched in sample 1's text
    assert [c[1] is None for c in columns] == [False, False, True, True, True, True]
    assert all(c[0] is not None and c[2] is not None for c in columns)


def test_batched_requests_get_logprobs_and_stop_rows(tokenizer, model):
    engine = Engine(model, tokenizer, compute_dtype=torch.float32)
    batcher = BatchingEngine(engine, max_rows=4)
    try:
        prompt = tokenizer.encode("Numbers like", prepend="bos")
        stopped: set[int] = set()
        steps, done = [], threading.Event()

        def deliver(item):  # called in the scheduler thread, before its next step (as the server's is)
            if item is DONE:
                done.set()
            else:
                steps.append(item)
                stopped.add(0)  # sample 0 ends after its first token

        batcher.submit(prompt, deliver, num_samples=2, max_tokens=6, temperature=0.0, logprobs=2, stopped=stopped)
        assert done.wait(30)
        # Greedy and alone in the batch: the same tokens as Engine.generate; sample 0 stopped after one token.
        assert [s[0][0] for s in steps] == [steps[0][0][0]] + [None] * 5
        tokens = [s[0][1] for s in steps]
        check_entries(model, prompt, tokens, [s[2][1] for s in steps], 2)
        alone = [c[0] for c, _ in engine.generate(prompt, max_tokens=6, temperature=0.0)]
        assert tokens == alone
    finally:
        batcher.close()
