"""Task views, TaskSequence and TaskMixture semantics (coverage, determinism, proportions, memory)."""

from __future__ import annotations

import time
import tracemalloc
from collections import Counter

import pytest

from picochat.tasks import Task, TaskMixture, TaskSequence
from picochat.tasks.base import FeistelPermutation


class Numbers(Task):
    """`n` synthetic rows; row i says which task and index it is. Building it is O(1)."""

    def __init__(self, label: str, n: int, **view):
        super().__init__(**view)
        self.label, self.n = label, n

    def num_rows(self) -> int:
        return self.n

    def get_row(self, index: int) -> dict:
        return {"messages": [{"role": "user", "content": f"{self.label} {index}"},
                             {"role": "assistant", "content": "ok"}], "task": self.label, "index": index}


def ids(task: Task) -> list[tuple[str, int]]:
    return [(row["task"], row["index"]) for row in task]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 16, 17, 255, 256, 1000, 4097])
def test_feistel_permutation_is_a_bijection(n):
    perm = FeistelPermutation(n, seed=7)
    assert sorted(perm(i) for i in range(n)) == list(range(n))


def test_feistel_permutation_rejects_out_of_range():
    with pytest.raises(IndexError):
        FeistelPermutation(10, seed=0)(10)


def test_views_slice_without_copying():
    task = Numbers("a", 100)
    view = task[10:50:3]
    assert len(view) == len(range(10, 50, 3))
    assert [r["index"] for r in view] == list(range(10, 50, 3))
    assert view[-1]["index"] == 49 - (49 - 10) % 3
    nested = view[2:5]
    assert [r["index"] for r in nested] == list(range(10, 50, 3))[2:5]
    assert len(task) == 100  # the original is untouched
    with pytest.raises(IndexError):
        view[len(view)]


def test_start_stop_step_arguments_match_slicing():
    assert ids(Numbers("a", 30, start=5, stop=25, step=4)) == ids(Numbers("a", 30)[5:25:4])
    assert len(Numbers("a", 30, stop=1000)) == 30


def test_sequence_concatenates_in_order():
    seq = TaskSequence([Numbers("a", 3), Numbers("b", 2), Numbers("c", 1)])
    assert ids(seq) == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("c", 0)]
    assert seq.locate(4) == (1, 1)
    assert ids(seq[2:5]) == [("a", 2), ("b", 0), ("b", 1)]


def test_mixture_covers_every_row_exactly_once_per_pass():
    tasks = [Numbers("a", 37), Numbers("b", 1), Numbers("c", 200), Numbers("d", 0)]
    mix = TaskMixture(tasks, seed=3)
    assert len(mix) == 238
    seen = Counter(ids(mix))
    expected = {(t.label, i) for t in tasks for i in range(len(t))}
    assert set(seen) == expected and all(count == 1 for count in seen.values())
    # locate() agrees with the rows
    for i in range(len(mix)):
        entry, local = mix.locate(i)
        assert (tasks[entry].label, local) == (mix[i]["task"], mix[i]["index"])


def test_mixture_is_deterministic_and_seeded():
    tasks = [Numbers("a", 50), Numbers("b", 80)]
    assert ids(TaskMixture(tasks, seed=1)) == ids(TaskMixture(tasks, seed=1))
    assert ids(TaskMixture(tasks, seed=1)) != ids(TaskMixture(tasks, seed=2))
    # it is a real shuffle, not the sequence order
    assert ids(TaskMixture(tasks, seed=1)) != ids(TaskSequence(tasks))


def test_mixture_oversamples_a_task_listed_twice():
    a, b = Numbers("a", 500), Numbers("b", 500)
    mix = TaskMixture([a, a, b], seed=0)
    seen = Counter(ids(mix))
    assert all(seen[("a", i)] == 2 and seen[("b", i)] == 1 for i in range(500))
    labels = Counter(row["task"] for row in mix[:300])
    assert 160 < labels["a"] < 240  # ~2/3 of any stretch


def test_mixture_proportions_hold_in_every_window():
    sizes = {"a": 1000, "b": 3000, "c": 6000}
    mix = TaskMixture([Numbers(k, n) for k, n in sizes.items()], seed=42)
    window = 1000
    for start in range(0, len(mix), window):
        counts = Counter(mix.locate(i)[0] for i in range(start, start + window))
        for entry, n in enumerate(sizes.values()):
            expected = window * n / len(mix)
            sigma = (expected * (1 - n / len(mix))) ** 0.5
            assert abs(counts[entry] - expected) < 5 * sigma


def test_mixture_views_and_nesting():
    inner = TaskMixture([Numbers("a", 10), Numbers("b", 10)], seed=5)
    outer = TaskMixture([inner, Numbers("c", 5)], seed=6)
    assert Counter(r["task"] for r in outer) == {"a": 10, "b": 10, "c": 5}
    assert ids(inner[3:9]) == ids(inner)[3:9]


def test_ten_million_row_mixture_builds_instantly_in_constant_memory():
    tracemalloc.start()
    t0 = time.perf_counter()
    mix = TaskMixture([Numbers("a", 5_000_000), Numbers("b", 3_000_000), Numbers("c", 2_000_000)], seed=1)
    build_s = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(mix) == 10_000_000
    assert build_s < 0.05
    assert peak < 100_000  # bytes: nothing proportional to the 10M rows
    rows = [mix[i] for i in range(0, 10_000_000, 99_991)]
    assert len({(r["task"], r["index"]) for r in rows}) == len(rows)
    assert mix[-1]["task"] in {"a", "b", "c"}


def test_composites_need_tasks():
    with pytest.raises(ValueError):
        TaskMixture([])
