"""Fixtures for inference tests: a tiny tokenizer trained here and tiny random GPTs."""

import pytest

from picochat import kernels
from picochat.infer import cpu_matmul
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


@pytest.fixture(params=[True, False], ids=["kernel", "torch-matmuls"])
def matmul_kernel(request, monkeypatch) -> bool:
    """Run a test with the small-batch C kernel and again with torch's matmuls only (as on a
    machine without a C compiler). Where there is a compiler, the kernel must build."""
    if request.param:
        if kernels.compiler() is None:
            pytest.skip("no C compiler on this machine: the kernel cannot be built")
        assert cpu_matmul.available(), "the small-matmul kernel did not build; see picochat/infer/cpu_matmul.py"
    else:
        monkeypatch.setattr(cpu_matmul, "available", lambda: False)
    return request.param
