"""Generated arithmetic word problems in GSM8K format: the offline stand-in for GSM8K train.

No registry package ships GSM8K's train split, and training on its test split would make
the GSM8K score meaningless. So offline SFT and RL use these problems instead: short
multi-step stories (shopping, sharing, speed, savings, discounts, ...) whose answers are
written exactly like GSM8K's, with calculator calls and a final line:

    Maya pays 4*3 = $<<4*3=12>>12 for the pens.
    Her change is 20-12 = $<<20-12=8>>8.
    #### 8

so `picochat.tasks.gsm8k.parse_answer` turns them into text / python / python_output parts
and `evaluate` / `reward` compare the final numbers, as for GSM8K.
Rows depend only on (split, index), so any size is free and reproducible. The space of
questions is small (a few hundred discount problems in all), so the splits are kept apart by
the question itself: about 10% of the possible questions (by a hash of their text) are
reserved for the test split, and no test question is ever a train question.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable

from picochat.tasks.base import GeneratedTask
from picochat.tasks.gsm8k import FinalAnswerGrading, word_problem_conversation

NAMES = ("Maya", "Liam", "Aisha", "Tom", "Sofia", "Kenji", "Elena", "Omar", "Grace", "Diego",
         "Priya", "Noah", "Zoe", "Ivan", "Amara", "Lucas", "Mei", "Sam", "Fatima", "Ben")
SHE = frozenset({"Maya", "Aisha", "Sofia", "Elena", "Grace", "Priya", "Zoe", "Amara", "Mei", "Fatima"})
ITEMS = ("pen", "notebook", "apple", "sticker", "marble", "cupcake", "book", "toy car", "candle", "plant")
FOODS = ("cookies", "muffins", "dumplings", "pancakes", "brownies")
TEST_PERCENT = 10  # share of the possible questions reserved for the test split


def pronoun(name: str) -> str:
    return "she" if name in SHE else "he"


def calc(expr: str, value: int) -> str:
    """'expr = <<expr=value>>value' as GSM8K writes a calculation."""
    return f"{expr} = <<{expr.replace(' ', '')}={value}>>{value}"


def shopping(rng: random.Random) -> tuple[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    count, price = rng.randint(2, 9), rng.randint(2, 15)
    cost = count * price
    bill = next(b for b in (20, 50, 100, 200) if b > cost)
    question = (f"{name} buys {count} {item}s that cost ${price} each and pays with a ${bill} bill. "
                f"How much change does {pronoun(name)} get?")
    answer = (f"{name} pays {calc(f'{count} * {price}', cost)} dollars for the {item}s.\n"
              f"So the change is {calc(f'{bill} - {cost}', bill - cost)} dollars.\n#### {bill - cost}")
    return question, answer


def sharing(rng: random.Random) -> tuple[str, str]:
    name, food = rng.choice(NAMES), rng.choice(FOODS)
    boxes, per_box = rng.randint(2, 8), rng.randint(4, 12)
    eaten = rng.randint(1, per_box - 1)
    total = boxes * per_box
    question = (f"{name} baked {total} {food} and packed them equally into {boxes} boxes. "
                f"Then {pronoun(name)} ate {eaten} {food} from one box. How many {food} are left in that box?")
    answer = (f"Each box holds {calc(f'{total} / {boxes}', per_box)} {food}.\n"
              f"After eating {eaten}, the box has {calc(f'{per_box} - {eaten}', per_box - eaten)} left.\n"
              f"#### {per_box - eaten}")
    return question, answer


def travel(rng: random.Random) -> tuple[str, str]:
    speed1, hours1 = rng.randint(3, 12) * 5, rng.randint(1, 5)
    speed2, hours2 = rng.randint(3, 12) * 5, rng.randint(1, 4)
    d1, d2 = speed1 * hours1, speed2 * hours2
    vehicle = rng.choice(("train", "bus", "car", "boat"))
    question = (f"A {vehicle} travels at {speed1} miles per hour for {hours1} hours, then at {speed2} miles "
                f"per hour for {hours2} hours. How many miles does it travel in total?")
    answer = (f"First it covers {calc(f'{speed1} * {hours1}', d1)} miles.\n"
              f"Then it covers {calc(f'{speed2} * {hours2}', d2)} miles.\n"
              f"In total that is {calc(f'{d1} + {d2}', d1 + d2)} miles.\n#### {d1 + d2}")
    return question, answer


def savings(rng: random.Random) -> tuple[str, str]:
    name = rng.choice(NAMES)
    weekly, weeks = rng.randint(3, 25), rng.randint(3, 12)
    saved = weekly * weeks
    spent = rng.randint(1, saved - 1)
    thing = rng.choice(("a bike helmet", "a video game", "a jacket", "concert tickets", "a board game"))
    question = (f"{name} saves ${weekly} every week. After {weeks} weeks, {pronoun(name)} spends ${spent} on "
                f"{thing}. How many dollars does {pronoun(name)} have left?")
    answer = (f"{name} saves {calc(f'{weekly} * {weeks}', saved)} dollars.\n"
              f"After buying {thing}, {pronoun(name)} has {calc(f'{saved} - {spent}', saved - spent)} dollars left.\n"
              f"#### {saved - spent}")
    return question, answer


def garden(rng: random.Random) -> tuple[str, str]:
    rows, per_row = rng.randint(3, 15), rng.randint(4, 20)
    plants = rows * per_row
    dead = rng.randint(1, plants // 3)
    crop = rng.choice(("tomato plants", "sunflowers", "rose bushes", "lettuce heads", "pepper plants"))
    question = (f"A garden has {rows} rows with {per_row} {crop} in each row. {dead} of them do not survive "
                f"the summer. How many {crop} are left?")
    answer = (f"The garden starts with {calc(f'{rows} * {per_row}', plants)} {crop}.\n"
              f"After losing {dead}, there are {calc(f'{plants} - {dead}', plants - dead)} left.\n"
              f"#### {plants - dead}")
    return question, answer


def discount(rng: random.Random) -> tuple[str, str]:
    percent = rng.choice((10, 20, 25, 50))
    price = rng.randint(2, 30) * 20  # a multiple of 20 keeps every discount a whole number
    off = price * percent // 100
    item = rng.choice(("jacket", "lamp", "backpack", "pair of shoes", "chair"))
    question = f"A {item} costs ${price}. It is on sale for {percent}% off. What is the sale price in dollars?"
    answer = (f"The discount is {calc(f'{price} * {percent} / 100', off)} dollars.\n"
              f"The sale price is {calc(f'{price} - {off}', price - off)} dollars.\n#### {price - off}")
    return question, answer


def ages(rng: random.Random) -> tuple[str, str]:
    young, old = rng.sample(NAMES, 2)
    age, factor, years = rng.randint(2, 12), rng.randint(2, 4), rng.randint(1, 10)
    now = age * factor
    question = (f"{young} is {age} years old. {old} is {factor} times as old as {young}. "
                f"How old will {old} be in {years} years?")
    answer = (f"{old} is {calc(f'{age} * {factor}', now)} years old now.\n"
              f"In {years} years {pronoun(old)} will be {calc(f'{now} + {years}', now + years)} years old.\n"
              f"#### {now + years}")
    return question, answer


def reading(rng: random.Random) -> tuple[str, str]:
    name = rng.choice(NAMES)
    monday, tuesday = rng.randint(5, 40), rng.randint(5, 40)
    wednesday = 2 * monday
    total = monday + tuesday + wednesday
    question = (f"{name} read {monday} pages on Monday and {tuesday} pages on Tuesday. On Wednesday "
                f"{pronoun(name)} read twice as many pages as on Monday. How many pages did {pronoun(name)} "
                f"read in the three days?")
    answer = (f"On Wednesday {name} read {calc(f'2 * {monday}', wednesday)} pages.\n"
              f"In total {pronoun(name)} read {calc(f'{monday} + {tuesday} + {wednesday}', total)} pages.\n"
              f"#### {total}")
    return question, answer


PROBLEMS: tuple[Callable[[random.Random], tuple[str, str]], ...] = (
    shopping, sharing, travel, savings, garden, discount, ages, reading,
)


def question_split(question: str) -> str:
    """The split a question belongs to, by a hash of its text."""
    return "test" if zlib.crc32(question.encode()) % 100 < TEST_PERCENT else "train"


class ArithmeticProblems(FinalAnswerGrading, GeneratedTask):
    """`size` generated word problems; evaluation and reward as for GSM8K."""

    key = "arithmetic"

    def get_row(self, index: int) -> dict:
        rng = self.rng(index)
        while True:  # draw until the question is one of this split's (~1.1 draws for train, ~10 for test)
            question, answer = rng.choice(PROBLEMS)(rng)
            if question_split(question) == self.split:
                return word_problem_conversation(question, answer)
