"""The report card shows the chat probe of each chat stage and says which val bpb is which."""

from __future__ import annotations

from picochat.report.report import build_report
from tests.report.test_report import base_run, fake_stage, home, write_json  # noqa: F401  (fixtures)

PROBE = {"stage": "sft", "tag": "d2", "step": 3,
         "settings": {"temperature": 0.7, "top_k": 50, "max_tokens": 256, "seed": 0},
         "metrics": {"answers": 30, "echo_share": 0.1, "echo_formats": ["#### answer"], "repeat_share": 0.034,
                     "dictionary_share": 0.912, "mean_tokens": 41.5, "mean_words": 30.2},
         "answers": [{"prompt": "Why is the sky blue?", "answer": "Because air scatters blue light.", "tokens": 7}]}


def test_report_shows_the_chat_probe_and_the_base_loss_standard_error(home):  # noqa: F811
    fake_stage(home, "sft", 3, {"val_loss": 1.1})
    write_json(home / "eval" / "chat_probe_sft_d2_step3.json", PROBE)
    write_json(home / "eval" / "chat_probe_sft_d2_step1.json", {**PROBE, "step": 1})  # older step: ignored
    write_json(home / "eval" / "base_loss_d2_step6.json", {
        "train_bpb": 2.5, "val_bpb": 2.6, "train_bpb_se": 0.012, "val_bpb_se": 0.009, "tokens_per_split": 393216,
        "training_eval_tokens": 393216, "training_eval_val_bpb": 2.6})
    text = build_report("d2").read_text()
    sft = text[text.index("## Supervised fine-tuning (SFT)"):]
    assert "### Chat probe: sft (step 3)" in sft and "(step 1)" not in sft
    assert "| answers echoing a task format | 10% | <= 10% |" in sft
    assert "| tokens in repeats (4-grams seen before in the answer) | 3.4% | <= 5% |" in sft
    assert "| dictionary words | 91.2% | >= 85% |" in sft
    assert "> **Why is the sky blue?**  \n> Because air scatters blue light." in sft
    assert "| val | 2.6000 | 0.0090 |" in text
    assert "the same tokens as the in-training eval (its last value 2.6000)" in text


def test_report_says_when_the_two_val_bpbs_read_different_tokens(home):  # noqa: F811
    write_json(home / "eval" / "base_loss_d2_step6.json", {
        "train_bpb": 2.5, "val_bpb": 2.6, "tokens_per_split": 262144, "training_eval_tokens": 32768,
        "training_eval_val_bpb": 2.4})
    text = build_report("d2").read_text()
    assert "the in-training eval read the first 32,768 (its last value 2.4000)" in text
    assert "| val | 2.6000 | - |" in text


def test_report_does_not_call_another_world_size_the_same_tokens(home):  # noqa: F811
    write_json(home / "eval" / "base_loss_d2_step6.json", {
        "train_bpb": 2.5, "val_bpb": 2.6, "tokens_per_split": 32768, "world_size": 1, "training_eval_tokens": 32768,
        "training_eval_world_size": 8, "training_eval_val_bpb": 2.4})
    text = build_report("d2").read_text()
    assert "the same tokens" not in text
    assert "the in-training eval read the first 32,768 on 8 processes (its last value 2.4000)" in text
