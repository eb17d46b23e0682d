"""SimpleSpelling and SpellingBee: generated rows are correct, varied and reproducible."""

from __future__ import annotations

import re

import pytest

from picochat.errors import DataError
from picochat.tasks import load_task
from picochat.tasks.spelling import SimpleSpelling, SpellingBee, split_words

WORDS = ["apple", "banana", "strawberry", "mississippi", "bookkeeper", "rhythm", "committee", "queue",
         "balloon", "level", "parallel", "success", "coffee", "noon", "address", "letter"]


def test_spelling_bee_answers_are_right_for_1000_rows():
    task = SpellingBee("train", size=1000, words=WORDS)
    letters_seen, prompts = set(), set()
    for conv in task:
        parts = conv["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["text", "python", "python_output", "text"]
        match = re.fullmatch(r"'([a-z]+)'\.count\('([a-z])'\)", parts[1]["text"])
        assert match, parts[1]["text"]
        word, letter = match.groups()
        assert (word, letter) == (conv["word"], conv["letter"])
        assert int(parts[2]["text"]) == word.count(letter) == conv["answer"]
        final = re.findall(r"\d+", parts[3]["text"])
        assert int(final[-1]) == conv["answer"]
        full = "".join(p["text"] for p in parts)
        assert task.evaluate(conv, full) and task.evaluate(conv, parts[3]["text"])
        assert not task.evaluate(conv, f"It appears {conv['answer'] + 1} times.")
        assert word in conv["messages"][0]["content"].lower()
        letters_seen.add(letter)
        prompts.add(re.sub(r"['\"]?[A-Za-z]+['\"]?", "w", conv["messages"][0]["content"]))
    assert len(letters_seen) > 10 and len(prompts) >= 6
    assert sum(conv["answer"] == 0 for conv in task) > 0  # some letters are absent from the word


def test_spelling_bee_grades_the_models_own_count_not_the_calculators():
    """A response that stops after the tool output has not answered: the count the calculator
    printed is not the model's. The model's own final number is graded, whatever the tool said."""
    task = SpellingBee("train", size=200, words=WORDS)
    for conv in task:
        parts = conv["messages"][1]["content"]
        assert task.evaluate(conv, parts)  # the reference answer, as parts
        assert not task.evaluate(conv, parts[:3])  # text, call, output: no answer of its own
        wrong = [*parts[:3], {"type": "text", "text": f"\n\nThe answer is {conv['answer'] + 1}."}]
        assert not task.evaluate(conv, wrong)


def test_rows_depend_only_on_split_and_index():
    a = SpellingBee("train", size=50, words=WORDS)
    b = SpellingBee("train", size=10_000, words=WORDS)
    assert [a[i] for i in range(50)] == [b[i] for i in range(50)]
    assert [a[i] for i in range(20)] != [SpellingBee("test", size=50, words=WORDS)[i] for i in range(20)]
    assert len(b[100:200]) == 100


def test_simple_spelling():
    task = SimpleSpelling("train", size=200, words=WORDS)
    for conv in task:
        word = conv["word"]
        answer = conv["messages"][1]["content"]
        assert answer == f"{word}: {','.join(word)}"
        assert task.evaluate(conv, answer)
        assert task.evaluate(conv, " ".join(word))
        assert not task.evaluate(conv, f"{word}: {','.join(word[:-1])}")
    assert len({conv["messages"][0]["content"].replace(conv["word"], "") for conv in task}) >= 4


def test_word_list_from_the_npm_package_is_split(offline_packages):
    train, test = split_words("train"), split_words("test")
    assert train and not set(train) & set(test)
    assert all(re.fullmatch(r"[a-z]{2,20}", w) for w in train + test)
    assert "a" not in train + test and "Zebra" not in train + test  # 1 letter / not lowercase
    conv = load_task("spelling_bee", "train", size=3)[0]
    assert conv["word"] in train
    assert offline_packages == ["word-list"]


def test_bad_arguments():
    with pytest.raises(DataError, match="split"):
        SpellingBee("validation", size=3, words=WORDS)
    with pytest.raises(DataError, match="size"):
        SimpleSpelling("train", size=-1, words=WORDS)
