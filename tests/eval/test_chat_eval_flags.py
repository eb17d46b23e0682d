"""chat-eval: --max-problems must be >= 1 or omitted (0 and -1 used to run the whole task)."""

from __future__ import annotations

import pytest

from picochat.cli import main


@pytest.mark.parametrize("value", ["0", "-1"])
def test_max_problems_below_one_is_refused(picochat_home, capsys, value: str):
    assert main(["chat-eval", "--max-problems", value]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --max-problems must be >= 1, got {value}; omit it to run every problem"
