"""Every task's conversations render with picochat's tokenizer without error."""

from __future__ import annotations

import itertools

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


def tool_calls(conv: dict) -> list[tuple[str, str]]:
    calls = []
    for message in conv["messages"]:
        parts = message["content"] if isinstance(message["content"], list) else []
        calls += [(a["text"], b["text"]) for a, b in itertools.pairwise(parts) if a["type"] == "python"]
    return calls


@pytest.mark.parametrize("name", ["identity", "arithmetic", "spelling_bee"])
def test_tool_outputs_match_the_inference_calculator(offline_packages, name):
    """What the model sees after a tool call in training is what the engine will insert at inference."""
    calculator = pytest.importorskip("picochat.infer").calculator
    task = load_task(name, "train", **({} if name == "identity" else {"size": 300}))
    calls = [call for conv in task for call in tool_calls(conv)]
    assert calls
    for expr, output in calls:
        assert calculator(expr) == output, expr


def test_tasks_pickle_for_dataloader_workers(offline_packages):
    import pickle

    task = TaskMixture([load_task("mmlu", "test"), load_task("spelling_bee", "train", size=10)], seed=1)
    clone = pickle.loads(pickle.dumps(task[2:8]))
    assert [clone[i] for i in range(len(clone))] == [task[i] for i in range(2, 8)]
