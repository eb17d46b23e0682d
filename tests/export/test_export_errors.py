"""export: an unwritable --out (or a failed weights write) is a one-line error, --out may start with ~,
and exported files get ordinary permissions."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
from safetensors import SafetensorError

from picochat.cli import main
from picochat.export import hf
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


def test_a_failed_weights_write_is_one_line(checkpoint, tmp_path: Path, monkeypatch, capsys):
    """safetensors raises its own error type for I/O failures (a full disk, a read-only directory)."""

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(hf, "save_file", full_disk)
    assert main(["export", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --out {tmp_path / 'hf'}: cannot write there") and "No space left" in err
    assert "\n" not in err


def test_out_with_an_unexpanded_home(checkpoint, tmp_path: Path, monkeypatch, capsys):
    """`--out=~/hf` reaches picochat with its tilde (the shell expands none after '='): written, and reported,
    under the home directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["export", "--out=~/hf"]) == 0
    assert (tmp_path / "hf" / "model.safetensors").exists()
    assert f"-> {tmp_path / 'hf'}" in capsys.readouterr().out


def test_a_failed_export_leaves_the_previous_one_whole(checkpoint, tmp_path: Path, monkeypatch, capsys):
    """Every file is written aside and moved in when all are complete: a full disk halfway through
    (here: while writing tokenizer.json) leaves the previous export as it was, and no temporary files."""
    out = tmp_path / "hf"
    assert main(["export", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(tokenizer):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hf, "hf_tokenizer_json", full_disk)
    assert main(["export", "--out", str(out), "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --out {out}: cannot write there (No space left on device)")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # A fresh directory: nothing is left behind, not even the directory.
    assert main(["export", "--out", str(tmp_path / "fresh" / "hf")]) == 2
    assert not (tmp_path / "fresh" / "hf").exists()


def test_the_step_comes_from_the_checkpoint_directory(checkpoint, picochat_home: Path):
    """A meta.json without "step" (it is not checksummed, and older ones may lack fields) still exports
    as step 1, the step its directory names, not as step 0."""
    meta = json.loads((checkpoint / "meta.json").read_text())
    del meta["step"]
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    assert main(["export"]) == 0
    out = picochat_home / "export" / "hf" / "sft-tiny-step1"
    assert json.loads((out / "picochat_source.json").read_text())["step"] == 1
