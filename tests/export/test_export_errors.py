"""export: an unwritable --out is a one-line error, and exported files get ordinary permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from picochat.cli import main
from tests.infer.tiny import save_tiny_checkpoint


@pytest.fixture
def checkpoint(picochat_home: Path) -> Path:
    return save_tiny_checkpoint()


def test_export_to_an_impossible_place_is_one_line(checkpoint, capsys):
    assert main(["export", "--out", "/proc/nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out /proc/nope: cannot write there") and "\n" not in err


def test_exported_files_have_ordinary_permissions(checkpoint, tmp_path: Path):
    old = os.umask(0o022)
    try:
        assert main(["export", "--out", str(tmp_path / "hf")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "hf").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes
