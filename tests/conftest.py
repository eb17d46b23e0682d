"""Fixtures shared by every test directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture
def picochat_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh $PICOCHAT_HOME under tmp_path, so a test never writes to ~/.cache/picochat."""
    home = tmp_path / "picochat_home"
    home.mkdir()
    monkeypatch.setenv("PICOCHAT_HOME", str(home))
    monkeypatch.delenv("PICOCHAT_REGISTRY_CACHE", raising=False)
    return home


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; several threads on a busy 2-core box spin against
    each other. Directories of tiny-model tests turn it on for all their tests (autouse there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _kernel_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The decode kernel (picochat/infer/cpu_matmul.py) is compiled into a directory of this
    test session, not into ~/.cache/picochat."""
    import os

    saved = os.environ.get("PICOCHAT_KERNEL_DIR")
    os.environ["PICOCHAT_KERNEL_DIR"] = str(tmp_path_factory.mktemp("kernels"))
    yield
    if saved is None:
        os.environ.pop("PICOCHAT_KERNEL_DIR", None)
    else:
        os.environ["PICOCHAT_KERNEL_DIR"] = saved
