"""The calculator evaluates plain arithmetic and .count, and refuses everything else quickly."""

import time

import pytest

from picochat.infer import calculator
from picochat.infer.calculator import CalculatorError, evaluate, format_number, strip_thousands_separators


@pytest.mark.parametrize(
    "expr, expected",
    [
        ("1+2", "3"),
        ("2*5", "10"),
        ("20/2", "10"),  # integer-valued float prints without .0
        ("7/2", "3.5"),
        ("1/3", "0.333333333333"),
        ("7//2", "3"),
        ("7%3", "1"),
        ("2**10", "1024"),
        ("-(3-5)", "2"),
        ("+4", "4"),
        ("(1 + 2) * (3 + 4)", "21"),
        ("1,000 * 3", "3000"),
        ("1,234,567 + 1", "1234568"),
        ("0.1 + 0.2", "0.3"),
        ("2.5 * 4", "10"),
        ("10**-2", "0.01"),
        ("'strawberry'.count('r')", "3"),
        ('"banana".count("a")', "3"),
        ("'a,b,c'.count(',')", "2"),  # commas inside a literal are kept
        ("'mississippi'.count('ss') + 1", "3"),
        ("  12 - 4  ", "8"),
        ("2**0.5 * 2**0.5", "2"),
    ],
)
def test_arithmetic(expr, expected):
    assert calculator(expr) == expected


def test_format_number():
    assert format_number(10.0) == "10"
    assert format_number(-3.0) == "-3"
    assert format_number(1e20) == "1e+20"
    assert format_number(12) == "12"


def test_thousands_separators_only_between_digit_groups():
    assert strip_thousands_separators("1,000+2,500") == "1000+2500"
    assert strip_thousands_separators("'1,000'.count(',')") == "'1,000'.count(',')"
    assert strip_thousands_separators("f(1,2)") == "f(1,2)"  # not a thousands group: left for the parser to refuse


HOSTILE = [
    "__import__('os').system('ls')",
    "import os",
    "open('/etc/passwd').read()",
    "().__class__.__bases__[0].__subclasses__()",
    "''.__class__",
    "'a'.__len__()",
    "'abc'.upper()",
    "'abc'.count('a', 0)",
    "'abc'.count(x='a')",
    "'abc'.count()",
    "'abc'.count(1)",
    "x.count('a')",
    "(1).count('a')",
    "count('a')",
    "eval('1+1')",
    "exec('x=1')",
    "globals()",
    "locals()",
    "getattr(1, 'real')",
    "(1).real",
    "1 .__class__",
    "lambda: 1",
    "(lambda x: x)(1)",
    "[x for x in range(10)]",
    "{x for x in range(3)}",
    "(x for x in range(3))",
    "{1: 2}",
    "[1, 2]",
    "(1, 2)",
    "(x := 5)",
    "f'{1+1}'",
    "f'{__import__(\"os\")}'",
    "9**9**9",
    "10**10**10",
    "2**100000",
    "(10**300)*(10**300)",
    "1e308*10",
    "1/0",
    "1//0",
    "5%0",
    "0**-1",
    "(-8)**0.5",
    "1j",
    "True + 1",
    "None",
    "...",
    "'a' * 1000000",
    "'ab' + 'cd'",
    "-'a'",
    "'" + "a" * 10_000 + "'.count('a')",
    "1+" * 200 + "1",
    "__import__",
    "(" * 1000 + "1" + ")" * 1000,
    "-" * 250 + "1",
    "1 if 1 else 2",
    "1 < 2",
    "1 and 2",
    "not 1",
    "~1",
    "1 << 1000000",
    "1 | 2",
    "a",
    "",
    "   ",
    "1 +",
    "print(1)",
    "__builtins__",
    "\x00",
    "1; import os",
    "await x",
    "yield 1",
    "*a",
    "b'abc'.count(b'a')",
    "'abc'[0]",
    "'abc'.count('a').__class__",
    "type(1)",
    "1e309",
]


@pytest.mark.parametrize("expr", HOSTILE)
def test_hostile_expressions_are_refused_fast(expr):
    start = time.monotonic()
    assert calculator(expr) is None
    with pytest.raises(CalculatorError):
        evaluate(expr)
    assert time.monotonic() - start < 1.0


def test_hostile_corpus_is_large_enough():
    assert len(HOSTILE) >= 50


def test_deep_but_short_nesting_is_harmless():
    assert calculator("(" * 100 + "1" + ")" * 100) == "1"
    assert calculator("-(-(-(1)))") == "-1"


def test_non_string_input_is_refused():
    assert calculator(None) is None
    assert calculator(12) is None


def test_error_messages_say_why():
    with pytest.raises(CalculatorError, match="exponent|too large"):
        evaluate("9**9**9")
    with pytest.raises(CalculatorError, match="not allowed"):
        evaluate("lambda: 1")
    with pytest.raises(CalculatorError, match="characters"):
        evaluate("1+" * 200 + "1")


def test_commas_inside_string_literals_with_escaped_quotes_are_kept():
    assert strip_thousands_separators(r"'it\'s 1,000'.count(',') + 1,000") == r"'it\'s 1,000'.count(',') + 1000"
    assert evaluate(r"'it\'s 1,000'.count(',')") == 1
    assert evaluate(r'"say \"1,000\"".count(",")') == 1


@pytest.mark.parametrize("value,expected", [
    (123456789012345.67, "123456789012345.67"),  # was '1.23456789012e+14'
    (1.2345678901234567e20, "1.2345678901234567e+20"),  # was '1.23456789012e+20'
    (0.1 + 0.2, "0.3"),  # float noise still hidden
    (1 / 3, "0.333333333333"),
    (1e20, "1e+20"),
])
def test_floats_keep_their_precision_where_repr_would(value: float, expected: str):
    assert format_number(value) == expected
    assert float(format_number(value)) == value or expected in ("0.3", "0.333333333333")
