"""Tasks: datasets of conversations for mid-training, SFT, RL and chat evaluation.

`load_task(name, split, source="offline", **kw)` builds any task by name, so stages can
describe their mixtures as data:

    mix = TaskMixture([load_task("smoltalk", "train"), load_task("arc_easy", "train"),
                       load_task("identity", "train"), load_task("identity", "train"),  # x2
                       load_task("spelling_bee", "train", size=80_000)], seed=42)

Names and their splits (offline / hf):
    smoltalk         train, test / train, test          chat (offline: ShareGPT)
    mmlu             validation, dev, test / + auxiliary_train
    arc_easy         train, validation, test            multiple choice
    arc_challenge    train, validation, test
    openbookqa       train, validation, test
    commonsenseqa    train, validation
    gsm8k            test / train, test                 math with calculator calls
    humaneval        test                               code, run against unit tests
    arithmetic       train, test (generated; `size=`)   GSM8K-format stand-in for GSM8K train
    simple_spelling  train, test (generated; `size=`)
    spelling_bee     train, test (generated; `size=`)
    identity         train                              built-in identity conversations
    customjson       any split name (`path=` a JSONL file)
Generated and file-based tasks ignore `source`. Every task also takes `start=`, `stop=`
and `step=` for a view of its rows. Data is cached under $PICOCHAT_HOME/datasets.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from picochat.errors import DataError
from picochat.tasks.arc import ARC
from picochat.tasks.arithmetic import ArithmeticProblems
from picochat.tasks.base import Task, TaskMixture, TaskSequence
from picochat.tasks.commonsenseqa import CommonsenseQA
from picochat.tasks.customjson import CustomJSON, identity
from picochat.tasks.gsm8k import GSM8K
from picochat.tasks.humaneval import HumanEval
from picochat.tasks.mmlu import MMLU
from picochat.tasks.openbookqa import OpenBookQA
from picochat.tasks.smoltalk import SmolTalk
from picochat.tasks.sources import SOURCES
from picochat.tasks.spelling import SimpleSpelling, SpellingBee


def _identity(split: str, source: str, **kw: Any) -> Task:
    if split != "train":
        raise DataError(f"identity: the built-in identity conversations have only a 'train' split, not {split!r}")
    return identity(**kw)


def _customjson(split: str, source: str, path: str | None = None, **kw: Any) -> Task:
    if path is None:
        raise DataError("customjson needs path=<a .jsonl file of conversations>")
    return CustomJSON(path, **kw)


TASKS: dict[str, Callable[..., Task]] = {
    "smoltalk": SmolTalk,
    "mmlu": MMLU,
    "arc_easy": partial(ARC, "ARC-Easy"),
    "arc_challenge": partial(ARC, "ARC-Challenge"),
    "openbookqa": OpenBookQA,
    "commonsenseqa": CommonsenseQA,
    "gsm8k": GSM8K,
    "humaneval": HumanEval,
    "arithmetic": lambda split, source, **kw: ArithmeticProblems(split, **kw),
    "simple_spelling": lambda split, source, **kw: SimpleSpelling(split, **kw),
    "spelling_bee": lambda split, source, **kw: SpellingBee(split, **kw),
    "identity": _identity,
    "customjson": _customjson,
}


def load_task(name: str, split: str, source: str = "offline", **kw: Any) -> Task:
    """The task `name` on `split` from `source` ("offline" registry packages or "hf" hub)."""
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    if source not in SOURCES:
        raise DataError(f"unknown task source {source!r}; use one of {', '.join(SOURCES)}")
    return TASKS[name](split, source, **kw)


__all__ = [
    "ARC", "GSM8K", "MMLU", "TASKS", "ArithmeticProblems", "CommonsenseQA", "CustomJSON", "HumanEval",
    "OpenBookQA", "SimpleSpelling", "SmolTalk", "SpellingBee", "Task", "TaskMixture", "TaskSequence",
    "identity", "load_task",
]
