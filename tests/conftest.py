"""Fixtures shared by every test directory."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def picochat_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh $PICOCHAT_HOME under tmp_path, so a test never writes to ~/.cache/picochat."""
    home = tmp_path / "picochat_home"
    home.mkdir()
    monkeypatch.setenv("PICOCHAT_HOME", str(home))
    monkeypatch.delenv("PICOCHAT_REGISTRY_CACHE", raising=False)
    return home
