"""Fixtures for inference tests: a tiny tokenizer trained here and tiny random GPTs."""

import pytest

from picochat.tokenizer import Tokenizer
from tests.infer.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return tiny_tokenizer()


@pytest.fixture
def model(tokenizer):
    return tiny_model(tokenizer.vocab_size)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread) -> None:
    """Every test here runs on one torch thread (tests/conftest.py)."""
