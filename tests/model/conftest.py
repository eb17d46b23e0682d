"""Tiny models: every test here runs on one torch thread."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread) -> None:
    """Every test here runs on one torch thread (tests/conftest.py)."""
