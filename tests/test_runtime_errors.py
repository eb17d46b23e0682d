"""runtime: a bad --device or $PICOCHAT_HOME is a one-line error naming the flag or variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from picochat.cli import main
from picochat.errors import ConfigError
from picochat.runtime import home, pick_device


def test_a_bogus_device_is_a_config_error():
    with pytest.raises(ConfigError, match=r"--device 'bogus' is not a device; use auto, cpu"):
        pick_device("bogus")


@pytest.mark.parametrize("where", ["file", "/proc/picochat-home"])
def test_picochat_home_must_be_a_writable_directory(tmp_path: Path, monkeypatch, capsys, where: str):
    path = tmp_path / "a-file" if where == "file" else Path(where)
    if where == "file":
        path.write_text("x")
    monkeypatch.setenv("PICOCHAT_HOME", str(path))
    with pytest.raises(ConfigError, match=rf"PICOCHAT_HOME={path} is not a writable directory"):
        home()
    assert main(["report"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: PICOCHAT_HOME={path}") and "\n" not in err
