"""GSM8K answer parsing and grading, and the generated arithmetic problems in the same format."""

from __future__ import annotations

import itertools
import re

import pytest

from picochat.tasks import load_task
from picochat.tasks.arithmetic import ArithmeticProblems
from picochat.tasks.gsm8k import GSM8K, extract_answer, parse_answer, word_problem_conversation

NATALIA = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
           "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
WENG = ("Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
        "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10")


def test_parse_answer_natalia():
    assert parse_answer(NATALIA) == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"},
        {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"},
    ]


def test_parse_answer_weng():
    assert parse_answer(WENG) == [
        {"type": "text", "text": "Weng earns 12/60 = $"},
        {"type": "python", "text": "12/60"},
        {"type": "python_output", "text": "0.2"},
        {"type": "text", "text": "0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $"},
        {"type": "python", "text": "0.2*50"},
        {"type": "python_output", "text": "10"},
        {"type": "text", "text": "10.\n#### 10"},
    ]


def test_parse_answer_edge_cases():
    assert parse_answer("no calls\n#### 5") == [{"type": "text", "text": "no calls\n#### 5"}]
    assert parse_answer("<<2+3=5>>5") == [{"type": "python", "text": "2+3"}, {"type": "python_output", "text": "5"},
                                          {"type": "text", "text": "5"}]
    # a '<<...>>' without '=' is not a call: it stays text, merged with its neighbours
    assert parse_answer("a <<b>> c") == [{"type": "text", "text": "a <<b>> c"}]


def test_extract_answer():
    assert extract_answer(NATALIA) == "72"
    assert extract_answer("so #### 1,234") == "1234"
    assert extract_answer("#### -3.5") == "-3.5"
    assert extract_answer("#### $18") == "18"
    assert extract_answer("the answer is 7") is None
    assert extract_answer("#### 1\n#### 2") == "2"


def test_evaluate_compares_final_numbers():
    task = GSM8K.__new__(GSM8K)  # evaluate needs no data
    conv = word_problem_conversation("q", WENG)
    assert task.evaluate(conv, "She earns 10 dollars.\n#### 10")
    assert task.evaluate(conv, "#### 10.0")
    assert task.evaluate(conv, [{"type": "text", "text": "#### "}, {"type": "text", "text": "10"}])
    assert not task.evaluate(conv, "#### 12")
    assert not task.evaluate(conv, "10")  # no '####' line: no answer
    assert task.reward(conv, "#### 10") == 1.0 and task.reward(conv, "#### 9") == 0.0


def safe_arithmetic(expr: str) -> float:
    assert re.fullmatch(r"[0-9+\-*/. ()]+", expr), expr
    return eval(expr)


def test_arithmetic_problems_are_correct_and_deterministic():
    task = load_task("arithmetic", "train", size=500)
    assert task.eval_type == "generative"
    for conv in task:
        parts = conv["messages"][1]["content"]
        calls = [(a["text"], b["text"]) for a, b in itertools.pairwise(parts) if a["type"] == "python"]
        assert calls and all(b["type"] == "python_output" for a, b in itertools.pairwise(parts) if a["type"] == "python")
        for expr, out in calls:
            assert safe_arithmetic(expr) == float(out)
        assert conv["answer"] == calls[-1][1]  # the last calculation is the answer
        text = "".join(p["text"] for p in parts)
        assert task.evaluate(conv, text) and not task.evaluate(conv, "#### 999999")
    assert task[123] == ArithmeticProblems("train", size=500)[123]
    assert task[5] != load_task("arithmetic", "test", size=500)[5]
    assert len({conv["messages"][0]["content"].split()[1] for conv in task}) > 5  # varied templates


def test_arithmetic_test_problems_are_never_train_problems():
    """The test split is held out: none of its questions is one of the (default-size) train split's."""
    train = {conv["messages"][0]["content"] for conv in ArithmeticProblems("train", size=7473)}
    test = [conv["messages"][0]["content"] for conv in ArithmeticProblems("test", size=400)]
    assert [q for q in test if q in train] == []


def parts(*pieces: tuple[str, str]) -> list[dict]:
    return [{"type": kind, "text": text} for kind, text in pieces]


def test_the_answer_comes_from_the_models_own_text_not_from_tool_parts():
    """A '#### n' is read from the text parts only: the calculator's expression and output are not the
    model's answer, so they can neither supply a number nor glue onto the model's digits."""
    task = GSM8K.__new__(GSM8K)
    conv = word_problem_conversation("q", NATALIA)  # reference 72
    # The model writes '#### ', calls the calculator, then writes the result itself: its answer is 72.
    assert task.evaluate(conv, parts(("text", "So in all:\n#### "), ("python", "48+24"),
                                     ("python_output", "72"), ("text", "72")))
    # ... and the call's expression (48) is not its answer.
    wrong = word_problem_conversation("q", "#### 48")
    assert not task.evaluate(wrong, parts(("text", "#### "), ("python", "48+24"),
                                          ("python_output", "72"), ("text", "72")))
    # A number only in a tool output (an output part the model opened itself) is no answer.
    assert not task.evaluate(conv, parts(("text", "#### "), ("python_output", "72")))
    assert not task.evaluate(conv, parts(("text", "The answer is"), ("python", "70+2"),
                                         ("python_output", "#### 72")))
    # Digits on both sides of a tool call are not one number.
    assert not task.evaluate(conv, parts(("text", "#### 7"), ("python", "1+1"), ("python_output", "2"),
                                         ("text", "2")))
    assert ArithmeticProblems("test", size=1).evaluate(conv, parts(("text", "#### "), ("python_output", "72"))) is False


@pytest.mark.parametrize("response, correct", [
    ("#### 72.", True),  # a trailing period ends the sentence, not the number
    ("#### 72.0", True),
    ("#### $72", True),
    ("#### 720", False),
    ("#### -72", False),
])
def test_final_answer_formats(response: str, correct: bool):
    task = GSM8K.__new__(GSM8K)
    conv = word_problem_conversation("q", NATALIA)
    assert task.evaluate(conv, response) is correct


@pytest.mark.parametrize("reference, response, correct", [
    ("#### 1,200", "#### 1200", True),
    ("#### 1200", "The total is $1,200.\n#### 1,200.", True),
    ("#### -3", "#### -3", True),
    ("#### -3", "#### 3", False),
    ("#### 0.5", "#### .5", False),  # no leading digit: not read as a number
    ("#### 2.50", "#### 2.5", True),
])
def test_final_answers_with_commas_decimals_and_signs(reference: str, response: str, correct: bool):
    task = GSM8K.__new__(GSM8K)
    assert task.evaluate(word_problem_conversation("q", reference), response) is correct
