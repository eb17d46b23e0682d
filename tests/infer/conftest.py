"""Fixtures for inference tests: a tiny tokenizer trained here and tiny random GPTs."""

import pytest
import torch

from picochat.tokenizer import Tokenizer
from tests.infer.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return tiny_tokenizer()


@pytest.fixture
def model(tokenizer):
    return tiny_model(tokenizer.vocab_size)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread; several threads on a busy 2-core box spin against each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
