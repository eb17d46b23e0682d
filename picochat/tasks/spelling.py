"""Spelling tasks generated from an English word list: SimpleSpelling and SpellingBee.

Small models see words as whole tokens, so they cannot tell which letters a word has.
- SimpleSpelling: "Spell the word: apple" -> "apple: a,p,p,l,e".
- SpellingBee: "How many 'p' are in 'apple'?" -> the assistant spells the word, calls
  the calculator tool with `'apple'.count('p')`, reads the output (2) and states the answer.

Rows are generated on the fly and depend only on (task, split, index): row i draws its
word, letter and phrasing from `random.Random("<task>:<split>:<i>")`, so any size is
free and every run sees the same rows. The word list is npm `word-list` 4.1.0
(`package/words.txt`, 274K lowercase words, MIT), fetched once with its pinned sha256;
about 10% of the words (by a hash of the word) are reserved for the test split, so test
rows ask about words train rows never use.
"""

from __future__ import annotations

import re
import zlib
from functools import lru_cache
from pathlib import Path

from filelock import FileLock

from picochat.errors import DataError
from picochat.fileio import write_text
from picochat.tasks.base import GENERATED_SPLITS as SPLITS
from picochat.tasks.base import GeneratedTask, model_text, response_text
from picochat.tasks.sources import WORD_LIST, datasets_dir, package_member

TEST_PERCENT = 10
ALPHABET = "abcdefghijklmnopqrstuvwxyz"

def word_list_path() -> Path:
    """The pinned word list as plain text (all [a-z] words of 2-20 letters), built once."""
    path = datasets_dir() / "words" / f"word-list-{WORD_LIST.version}.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if not path.exists():
                text = package_member(WORD_LIST, "package/words.txt").decode("utf-8")
                words = sorted({w for w in text.split() if re.fullmatch(r"[a-z]{2,20}", w)})
                write_text(path, "\n".join(words) + "\n")
    return path


@lru_cache(maxsize=4)
def _words_by_split(path: str) -> dict[str, list[str]]:
    """Words of each split: test = words whose crc32 % 100 < TEST_PERCENT, train = the rest."""
    words = Path(path).read_text().split()
    if not words:
        raise DataError(f"{path} is empty; delete it to rebuild the word list")
    by_split: dict[str, list[str]] = {name: [] for name in SPLITS}
    for word in words:
        by_split["test" if zlib.crc32(word.encode()) % 100 < TEST_PERCENT else "train"].append(word)
    return by_split


def split_words(split: str) -> list[str]:
    if split not in SPLITS:
        raise DataError(f"spelling tasks have splits {SPLITS}, not {split!r}")
    return _words_by_split(str(word_list_path()))[split]


class _WordTask(GeneratedTask):
    """A generated task over the words of its split (or an explicit word list, for tests)."""

    def __init__(self, split: str = "train", size: int = 1000, words: list[str] | None = None,
                 **view: int | None):
        super().__init__(split, size, **view)
        self.words = words if words is not None else split_words(split)
        if not self.words:
            raise DataError(f"{type(self).__name__}: no words for split {split!r}; the word list is empty")


SPELL_PROMPTS = (
    "Spell the word: {word}",
    "How do you spell {word}?",
    "Spell '{word}' letter by letter.",
    "Can you spell \"{word}\" for me?",
    "What are the letters of {word}, in order?",
    "spell {word}",
)


class SimpleSpelling(_WordTask):
    """Spell a word letter by letter; evaluation checks the letters after the last ':'."""

    key = "simple_spelling"

    def get_row(self, index: int) -> dict:
        rng = self.rng(index)
        word = rng.choice(self.words)
        prompt = rng.choice(SPELL_PROMPTS).format(word=word)
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": f"{word}: {','.join(word)}"}]
        return {"messages": messages, "word": word}

    def evaluate(self, conversation: dict, response: str | list[dict]) -> bool:
        spelled = response_text(response).rsplit(":", 1)[-1]
        return "".join(re.findall(r"[a-z]", spelled.lower())) == conversation["word"]


COUNT_PROMPTS = (
    "How many {letter} are in the word {word}?",
    "How many times does the letter {letter} appear in {word}?",
    "Count the number of {letter}'s in {word}.",
    "In the word {word}, how many times do you see the letter {letter}?",
    "how many {letter}s in {word}",
    "What is the count of the letter {letter} in {word}?",
    "Tell me how many {letter}'s there are in {word}.",
    "Does {word} contain the letter {letter}? How many times?",
)
QUOTES = ("", "'", '"')
ANSWER_PHRASES = (
    "So the letter '{letter}' appears {count} {times} in '{word}'.",
    "There {are} {count} '{letter}' in '{word}'.",
    "The answer is {count}.",
)


class SpellingBee(_WordTask):
    """Count a letter in a word with the calculator tool; evaluation reads the final number the
    model writes itself (the calculator's output is not an answer)."""

    key = "spelling_bee"

    def get_row(self, index: int) -> dict:
        rng = self.rng(index)
        word = rng.choice(self.words)
        # Mostly letters of the word (the interesting case); sometimes any letter (count may be 0).
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(ALPHABET)
        count = word.count(letter)
        template = rng.choice(COUNT_PROMPTS)
        quote = rng.choice(QUOTES)
        letter_quote = "" if "{letter}s" in template or "{letter}'s" in template else quote  # no "'a''s"
        shown_word = word.capitalize() if rng.random() < 0.1 else word
        shown_letter = letter.upper() if rng.random() < 0.2 else letter
        prompt = template.format(letter=f"{letter_quote}{shown_letter}{letter_quote}",
                                 word=f"{quote}{shown_word}{quote}")
        if rng.random() < 0.3:
            prompt = prompt.rstrip("?.")  # people often skip the punctuation
        answer = rng.choice(ANSWER_PHRASES).format(letter=letter, word=word, count=count,
                                                   times="time" if count == 1 else "times",
                                                   are="is" if count == 1 else "are")
        reply = [
            {"type": "text", "text": f"Spelled out, '{word}' is {','.join(word)}. "
                                     f"Let me count the letter '{letter}' with Python:\n\n"},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\n{answer}"},
        ]
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
        return {"messages": messages, "word": word, "letter": letter, "answer": count}

    def evaluate(self, conversation: dict, response: str | list[dict]) -> bool:
        """The last number of the model's own text (not the calculator's output) is the count."""
        numbers = re.findall(r"-?\d+", model_text(response))
        return bool(numbers) and int(numbers[-1]) == conversation["answer"]
