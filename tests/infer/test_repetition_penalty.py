"""The repetition penalty: the logit transform, the sampler, the engine's per-sample history, and the chat default."""

from __future__ import annotations

import torch

from picochat.infer import Engine
from picochat.infer.engine import REPEAT_WINDOW
from picochat.infer.sampling import capped, penalize_repeats, sample_next, top_candidates


def test_penalize_repeats_scales_each_recent_id_once_toward_less_likely():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [1.0, 1.0, 1.0, 1.0]])
    recent = torch.tensor([[3, 3, 1, -1], [-1, -1, -1, -1]])  # row 0: ids 3 (twice) and 1; row 1: nothing yet
    out = penalize_repeats(logits, recent, 2.0)
    assert out.tolist() == [[2.0, -2.0, 0.5, 1.5], [1.0, 1.0, 1.0, 1.0]]  # id 0 untouched despite the -1 padding


def test_sample_next_with_a_penalty_moves_greedy_off_a_repeated_token():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    recent = torch.tensor([[1]])
    assert sample_next(logits, None, temperature=0.0).tolist() == [1]
    assert sample_next(logits, None, temperature=0.0, recent=recent, repetition_penalty=2.0).tolist() == [2]
    assert sample_next(logits, None, temperature=0.0, recent=recent, repetition_penalty=1.0).tolist() == [1]
    # with a softcap the penalty applies to the capped logits: 15*tanh(3/15)=2.96 / 2 < 15*tanh(2/15)=1.99
    assert sample_next(logits, None, temperature=0.0, softcap=15.0, recent=recent, repetition_penalty=2.0).tolist() == [2]


def test_engine_penalty_is_per_call_and_cuts_repeats(tokenizer, model):
    engine = Engine(model, tokenizer, compute_dtype=torch.float32)
    prompt = tokenizer.encode("Hello there! How are you", prepend=tokenizer.bos_id)
    plain, _ = engine.generate_batch(prompt, max_tokens=40, temperature=0.0)
    assert engine.generate_batch(prompt, max_tokens=40, temperature=0.0, repetition_penalty=None)[0] == plain
    assert engine.generate_batch(prompt, max_tokens=40, temperature=0.0, repetition_penalty=1.0)[0] == plain
    guarded, _ = engine.generate_batch(prompt, max_tokens=40, temperature=0.0, repetition_penalty=50.0)
    assert len(set(guarded[0])) > len(set(plain[0]))  # the greedy loop is broken: more distinct tokens
    # sampled rows each keep their own history: two samples with a penalty still run and differ
    two, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=20, temperature=1.0, seed=3,
                                   repetition_penalty=1.3)
    assert len(two) == 2 and two[0] != two[1]
    assert REPEAT_WINDOW >= 16


def test_chat_and_serve_take_their_defaults_from_the_chat_sampling_settings():
    import argparse

    from picochat import chat_cli
    from picochat.infer.chat_defaults import CHAT_SAMPLING
    from picochat.serve import commands as serve_commands

    for add_arguments in (chat_cli.add_arguments, serve_commands.add_arguments):
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        args = parser.parse_args([])
        assert (args.temperature, args.top_k, args.max_tokens, args.repetition_penalty) == (
            CHAT_SAMPLING.temperature, CHAT_SAMPLING.top_k, CHAT_SAMPLING.max_tokens, CHAT_SAMPLING.repetition_penalty)
    assert 0 < CHAT_SAMPLING.temperature <= 1.0 and CHAT_SAMPLING.max_tokens <= 512  # sampled and capped, not greedy
    assert CHAT_SAMPLING.repetition_penalty > 1.0  # on: loops are what a small model's chat shows most


def test_chat_cli_passes_the_penalty_and_refuses_a_bad_one(picochat_home, capsys):
    from picochat.cli import main
    from tests.infer.tiny import save_tiny_checkpoint

    save_tiny_checkpoint("sft", "tiny")
    argv = ["chat", "-p", "Hello there!", "--max-tokens", "8", "--seed", "1", "--device", "cpu", "--dtype", "fp32"]
    assert main(argv + ["--repetition-penalty", "1.3"]) == 0
    assert main(argv + ["--repetition-penalty", "-1"]) == 2
    assert "--repetition-penalty -1.0: must be in (0, 10]" in capsys.readouterr().err


def test_the_penalized_top_k_equals_penalizing_the_whole_vocabulary_first():
    """top_candidates looks at the k + W best logits only: a penalty >= 1 lowers at most W of a row, so
    the k best after it are the ones penalize_repeats over the whole vocabulary gives."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1000, generator=generator) * 8
    top = logits.topk(40, dim=-1).indices
    recent = torch.cat([top[:, :24], torch.randint(-1, 1000, (6, 40), generator=generator)], dim=1)  # the best, and noise
    for penalty in (1.1, 1.5, 3.0, torch.tensor([[1.2], [2.0], [1.0], [5.0], [1.3], [1.05]])):
        full = penalize_repeats(capped(logits, 15.0), recent, penalty).topk(10, dim=-1)
        values, ids = top_candidates(logits, 10, 15.0, recent, penalty)
        assert torch.equal(ids, full.indices) and torch.equal(values, full.values)


def test_a_penalty_without_recent_tokens_changes_nothing_in_either_sampler():
    from picochat.infer.sampling import sample_many

    logits = torch.randn(3, 200, generator=torch.Generator().manual_seed(2))
    plain = sample_many(logits, [(3, {"temperature": 0.0, "top_k": None})])
    assert sample_many(logits, [(3, {"temperature": 0.0, "top_k": None, "repetition_penalty": 3.0})]) == plain
    assert sample_next(logits, None, temperature=0.0, repetition_penalty=3.0).tolist() == plain
