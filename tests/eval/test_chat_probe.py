"""Chat probe metrics on handmade answers, and the command on a tiny checkpoint."""

from __future__ import annotations

import json

import pytest

from picochat.eval import chat_probe
from picochat.eval.chat_probe import (
    answer_words,
    dictionary_words,
    probe_tokens,
    repeated_tokens,
    summarize,
    task_formats,
)

DICTIONARY = frozenset({"the", "sky", "is", "blue", "because", "air", "scatters", "light", "do", "not", "know", "cat",
                        "sat", "on", "mat", "can", "will"})


def test_task_formats_finds_each_drill_and_spares_plain_english():
    assert task_formats("Spelled out, 'tailing' is t,a,i,l,i,n,g") == ["spelling list"]
    assert task_formats("He pays 3*4 = <<3*4=12>>12 dollars.\n#### 12") == ["#### answer", "calculator call"]
    assert task_formats("<|python_start|>12*7<|python_end|>") == ["calculator call"]
    assert task_formats("<<12*7=84>>84", prompt="What is 12 times 7?") == []  # asked for arithmetic
    assert task_formats("B") == ["multiple choice"]
    assert task_formats("Answer: C") == ["multiple choice"]
    assert task_formats("Pick one:\nA. red\nB. blue") == ["multiple choice"]
    for english in ("The answer is a dog.", "A cat, a dog, a bird: all pets.", "I like tea, and you?",
                    "Plan A. Then plan B.", "#### Tips for sleep\nGo to bed early."):
        assert task_formats(english) == [], english


def test_repeated_tokens_counts_positions_that_close_a_seen_four_gram():
    assert probe_tokens("Hi, Bob!") == ["hi", ",", "bob", "!"]
    assert repeated_tokens(probe_tokens("the sky is blue because air scatters light")) == 0
    loop = probe_tokens("s,s,s,s,s,s")  # 11 tokens, 8 four-grams: the first two are new
    assert len(loop) == 11 and repeated_tokens(loop) == 6
    phrase = probe_tokens("I do not know. I do not know.")  # "i do not know" and "do not know ." close again
    assert repeated_tokens(phrase) == 2
    assert repeated_tokens(["a", "b"]) == 0


def test_answer_words_and_dictionary_share():
    assert answer_words("Don't know, can't say; it's BLUE!") == ["do", "know", "can", "say", "it", "blue"]
    assert dictionary_words(["the", "sky", "zzqx", "a", "i", "x"], DICTIONARY) == 4


def test_summarize_gives_the_four_figures():
    answers = [
        {"prompt": "Why is the sky blue?", "answer": "The sky is blue because air scatters light.", "tokens": 10},
        {"prompt": "Spell?", "answer": "c,a,t,s,s,s,s,s", "tokens": 30},
    ]
    m = summarize(answers, DICTIONARY)
    assert m["echo_share"] == 0.5 and m["echo_formats"] == ["spelling list"]
    assert m["mean_tokens"] == 20.0
    # words: 8 known + c,a,t,s,s,s,s,s (only "a" counts) = 9 of 16
    assert m["dictionary_share"] == pytest.approx(9 / 16)
    n_tokens = len(probe_tokens(answers[0]["answer"])) + len(probe_tokens(answers[1]["answer"]))
    assert m["repeat_share"] == pytest.approx(repeated_tokens(probe_tokens(answers[1]["answer"])) / n_tokens)
    with pytest.raises(Exception, match="at least one answer"):
        summarize([], DICTIONARY)


def test_prompts_are_thirty_distinct_everyday_questions():
    assert len(chat_probe.PROMPTS) == 30 == len(set(chat_probe.PROMPTS))
    assert all(task_formats(p) == [] for p in chat_probe.PROMPTS)


def test_only_the_chat_defaults_write_the_name_the_report_reads():
    d = chat_probe.CHAT_SAMPLING
    defaults = {"temperature": d.temperature, "top_k": d.top_k, "max_tokens": d.max_tokens,
                "repetition_penalty": d.repetition_penalty, "seed": 0}
    assert chat_probe.probe_file_stem("sft", "d4", 90, defaults, None) == "chat_probe_sft_d4_step90"
    greedy = {**defaults, "temperature": 0.0}
    assert (chat_probe.probe_file_stem("sft", "d4", 90, greedy, None)
            == f"chat_probe_sft_d4_step90_t0_k{d.top_k}_n{d.max_tokens}_rp{d.repetition_penalty:g}_s0")
    assert chat_probe.probe_file_stem("sft", "d4", 90, defaults, 5).endswith("_l5")
    penalized = {**greedy, "repetition_penalty": 1.3}
    assert chat_probe.probe_file_stem("sft", "d4", 90, penalized, None).endswith(f"_n{d.max_tokens}_rp1.3_s0")


def test_render_markdown_shows_figures_and_answers():
    result = {"stage": "sft", "step": 7, "settings": {"temperature": 0.7, "top_k": 50, "max_tokens": 64,
                                                      "repetition_penalty": 1.2, "seed": 0},
              "metrics": {"answers": 1, "echo_share": 0.0, "echo_formats": [], "repeat_share": 0.02,
                          "dictionary_share": 0.9, "mean_tokens": 12.0, "mean_words": 9.0},
              "answers": [{"prompt": "Hi", "answer": "Hello there.\nHow are you?", "tokens": 6}]}
    md = chat_probe.render_markdown(result)
    assert "| dictionary words | 90.0% | >= 85% |" in md and "repetition penalty 1.2" in md and "> Hello there.  \n> How are you?" in md
    json.dumps(result)


def test_chat_probe_command_writes_json_and_markdown(picochat_home, monkeypatch, capsys):
    from picochat.cli import main
    from tests.infer.tiny import save_tiny_checkpoint

    save_tiny_checkpoint("sft", "tiny", sequence_len=128)
    monkeypatch.setattr(chat_probe, "english_words", lambda: DICTIONARY)  # no word-list download in tests
    argv = ["chat-probe", "--stage", "sft", "--limit", "3", "--max-tokens", "8", "--device", "cpu", "--dtype", "fp32"]
    assert main(argv) == 0
    assert "### Chat probe: sft (step 1)" in capsys.readouterr().out
    (path,) = (picochat_home / "eval").glob("chat_probe_sft_tiny_step1_*.json")  # not the defaults: a variant name
    assert path.name == "chat_probe_sft_tiny_step1_t0.7_k50_n8_rp1.2_s0_l3.json"
    result = json.loads(path.read_text())
    assert [a["prompt"] for a in result["answers"]] == list(chat_probe.PROMPTS[:3])
    assert all(0 < a["tokens"] <= 8 for a in result["answers"]) and result["settings"]["seed"] == 0
    assert path.with_suffix(".md").read_text().startswith("### Chat probe")
    assert main(argv) == 0  # fixed seeds: the same answers again
    again = json.loads(path.read_text())
    assert again["answers"] == result["answers"]
    assert main(argv + ["--temperature", "3"]) == 2
    assert "--temperature 3.0: must be between 0 and 2" in capsys.readouterr().err
    assert main(argv + ["--repetition-penalty", "1.5"]) == 0
    assert (picochat_home / "eval" / "chat_probe_sft_tiny_step1_t0.7_k50_n8_rp1.5_s0_l3.json").exists()
    assert main(argv + ["--repetition-penalty", "0"]) == 2
    assert "--repetition-penalty 0.0: must be in (0, 10]" in capsys.readouterr().err
