"""Every task's conversations render with picochat's tokenizer without error."""

from __future__ import annotations

import pytest

from picochat.tasks import TaskMixture, TaskSequence, load_task

OFFLINE = [("smoltalk", "train"), ("mmlu", "test"), ("arc_easy", "train"), ("arc_challenge", "test"),
           ("openbookqa", "validation"), ("commonsenseqa", "train"), ("gsm8k", "test"), ("humaneval", "test"),
           ("identity", "train")]
GENERATED = ["arithmetic", "simple_spelling", "spelling_bee"]


@pytest.mark.parametrize(("name", "split"), OFFLINE + [(g, "train") for g in GENERATED])
def test_task_renders(offline_packages, small_tokenizer, name, split):
    kw = {"size": 50} if name in GENERATED else {}
    task = load_task(name, split, **kw)
    assert len(task) > 0
    for conv in task:
        ids, mask = small_tokenizer.render_conversation(conv, max_tokens=None)
        assert len(ids) == len(mask) and ids[0] == small_tokenizer.bos_id
        assert any(mask)  # the assistant's tokens are trained on
        prompt = small_tokenizer.render_for_completion(conv)
        assert prompt[-1] == small_tokenizer.encode_special("assistant_start")


def test_a_stage_mixture_renders(offline_packages, small_tokenizer):
    mix = TaskMixture([load_task("smoltalk", "train"), load_task("arc_easy", "train"),
                       load_task("identity", "train"), load_task("identity", "train"),
                       load_task("spelling_bee", "train", size=20), load_task("arithmetic", "train", size=20)])
    seq = TaskSequence([mix, load_task("simple_spelling", "train", size=5)])
    assert len(seq) == len(mix) + 5
    for conv in seq:
        small_tokenizer.render_conversation(conv)
