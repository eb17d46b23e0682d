"""Checkpoint integrity: checksums recorded while writing and verified on load, one-line errors for
damaged files, a full disk, a resume past a damaged newest step, and a resume with another --depth."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from picochat import checkpoint as ckpt
from picochat.cli import main
from picochat.errors import DataError
from tests.infer.tiny import tiny_model, tiny_tokenizer

TINY = ["base-train", "--preset", "cpu-tiny", "--dtype", "fp32", "--eval-every", "-1", "--sample-every", "-1"]


@pytest.fixture
def saved(picochat_home: Path) -> Path:
    """A tiny training checkpoint (weights, config, tokenizer, state.pt) at step 3."""
    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size)
    state = {"step": 3, "optimizers": [{"lr": torch.ones(4)}]}
    return ckpt.save_checkpoint(picochat_home / "run", 3, model, tok, {"stage": "base"}, state=state)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_checksums_are_recorded_for_what_was_written(saved: Path):
    checksums = json.loads((saved / "meta.json").read_text())["checksums"]
    assert set(checksums) == {"model.safetensors", "config.json", "state.pt"}
    for name, digest in checksums.items():
        assert sha256(saved / name) == digest, name
    _, _, meta = ckpt.load_checkpoint_dir(saved)
    assert meta["step"] == 3 and ckpt.load_training_state(saved)["step"] == 3


@pytest.mark.parametrize("name", ["model.safetensors", "state.pt"])
def test_a_flipped_byte_is_a_clear_error(saved: Path, name: str):
    data = bytearray((saved / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (saved / name).write_bytes(bytes(data))
    load = ckpt.load_checkpoint_dir if name == "model.safetensors" else ckpt.load_training_state
    with pytest.raises(DataError, match=rf"{name} does not match its checksum in meta.json"):
        load(saved)


def test_a_changed_value_in_config_json_is_a_clear_error(saved: Path):
    path = saved / "config.json"
    config = json.loads(path.read_text())
    path.write_text(path.read_text().replace(json.dumps(config["softcap"]), json.dumps(config["softcap"] + 80)))
    assert json.loads(path.read_text())["softcap"] != config["softcap"]  # still a valid config, but not the one saved
    damaged = r"config.json does not match its checksum in meta.json"
    with pytest.raises(DataError, match=damaged):
        ckpt.load_checkpoint_dir(saved)
    with pytest.raises(DataError, match=damaged):
        ckpt.check_resumable(saved)
    tok = tiny_tokenizer()
    with pytest.raises(DataError, match=damaged):
        ckpt.load_weights_into(tiny_model(tok.vocab_size), saved, json.loads((saved / "meta.json").read_text()))


def drop_checksums(step_dir: Path) -> None:
    meta = json.loads((step_dir / "meta.json").read_text())
    del meta["checksums"]
    (step_dir / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", [
    lambda data: data[: len(data) // 2],  # truncated
    lambda data: b"",  # empty
    lambda data: b"\xff" * 8 + data[8:],  # header length nonsense
    lambda data: data[:8] + b"{not json" + data[17:],  # header garbled
])
def test_a_damaged_safetensors_file_names_itself(saved: Path, damage):
    drop_checksums(saved)  # as in a checkpoint written before checksums: the reader must cope alone
    path = saved / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError, match=r"model.safetensors is not a readable safetensors file"):
        ckpt.load_checkpoint_dir(saved)


def test_a_damaged_state_pt_without_checksums_is_a_clear_error(saved: Path):
    drop_checksums(saved)
    (saved / "state.pt").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DataError, match=r"state.pt is damaged"):
        ckpt.load_training_state(saved)


@pytest.mark.parametrize("name", ["meta.json", "config.json"])
@pytest.mark.parametrize("text,problem", [("{\"step\": 3,", "is not readable JSON"), ("[1, 2]", "holds a JSON list"),
                                          ("", "is not readable JSON"), ("{\"n_layer\": \"x\", \"bogus\": 1}", None)])
def test_broken_json_files_name_themselves(saved: Path, name: str, text: str, problem: str | None):
    (saved / name).write_text(text)
    if problem is None:  # a JSON object with the wrong fields
        if name == "meta.json":
            return  # meta.json fields are free-form
        problem = "unknown fields"
    with pytest.raises(DataError, match=rf"{name}.*{problem}|{problem}.*{name}"):
        ckpt.load_checkpoint_dir(saved)


@pytest.mark.parametrize("fail_on", ["model", "state"])
def test_a_full_disk_says_no_space_and_keeps_the_previous_checkpoint(saved: Path, monkeypatch, fail_on: str):
    real = ckpt.write_chunk

    def full_disk(file, data):
        big = len(data) > 1000 if fail_on == "model" else Path(file.name).name == "state.pt"
        if big:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(file, data)

    monkeypatch.setattr(ckpt, "write_chunk", full_disk)
    tok = tiny_tokenizer()
    with pytest.raises(DataError, match=r"^no space left on .*run while saving step 4"):
        ckpt.save_checkpoint(saved.parent, 4, tiny_model(tok.vocab_size), tok, {}, state={"x": torch.zeros(3)})
    assert ckpt.list_steps(saved.parent) == [3]
    assert [p.name for p in saved.parent.iterdir() if p.name.startswith(".")] == []  # no half-written step
    ckpt.load_checkpoint_dir(saved)


def test_resume_skips_a_damaged_newest_step(tiny_home: Path, capsys):
    args = TINY + ["--num-iterations", "8", "--save-every", "4", "--keep-last", "5", "--tag", "hurt"]
    assert main(args) == 0
    run = ckpt.run_dir("base", "hurt")
    (run / "step_8" / "state.pt").write_bytes(b"not a pickle")
    capsys.readouterr()
    assert ckpt.newest_resumable_step(run) == 4
    assert main(args + ["--resume"]) == 0
    err = capsys.readouterr()
    assert "warning: --resume: skipping step 8" in err.err and "state.pt" in err.err
    assert "resumed from" in err.out + err.err and "step_4" in err.out + err.err
    assert ckpt.newest_resumable_step(run) == 8  # re-saved, good again


def test_resume_with_another_depth_is_a_clear_error(tiny_home: Path, capsys):
    args = TINY + ["--num-iterations", "2", "--save-every", "2", "--tag", "deep"]
    assert main(args + ["--depth", "2"]) == 0
    capsys.readouterr()
    assert main(args + ["--depth", "3", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "holds a different model (n_layer 2 there, 3 here" in err
    assert "--depth" in err


def test_a_command_loading_flipped_weights_says_so_in_one_line(picochat_home: Path, capsys):
    from tests.infer.tiny import save_tiny_checkpoint

    step_dir = save_tiny_checkpoint()
    data = bytearray((step_dir / "model.safetensors").read_bytes())
    data[-10] ^= 0x01
    (step_dir / "model.safetensors").write_bytes(bytes(data))
    assert main(["export", "--out", str(picochat_home / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "model.safetensors does not match its checksum" in err and "\n" not in err


def test_pruning_keeps_the_step_just_written_and_drops_an_earlier_runs_higher_steps(picochat_home: Path):
    """keep_last counts back from the step just saved. A fresh run under a tag that holds an earlier run's
    steps 8 and 12 used to delete its own step 4 (the newest two were 8 and 12), and --resume then
    continued the earlier run."""
    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size)
    run = picochat_home / "run"
    for step in (8, 12):
        ckpt.save_checkpoint(run, step, model, tok, {}, state={"x": torch.zeros(1)}, keep_last=2)
    assert ckpt.list_steps(run) == [8, 12]
    ckpt.save_checkpoint(run, 4, model, tok, {}, state={"x": torch.zeros(1)}, keep_last=2)
    assert ckpt.list_steps(run) == [4]
    for step in (5, 6, 7):
        ckpt.save_checkpoint(run, step, model, tok, {}, state={"x": torch.zeros(1)}, keep_last=2)
    assert ckpt.list_steps(run) == [6, 7]


def test_a_resave_stopped_between_its_renames_keeps_the_old_copy(saved: Path, monkeypatch):
    """Re-saving a step moves the old copy aside until the new one is in place: a crash in between
    (here the second rename fails) loses neither, and the next save restores the old copy first."""
    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size)
    before = sha256(saved / "model.safetensors")
    real = ckpt.os.replace

    def crash_moving_the_new_copy_in(src, dst):
        if Path(dst) == saved and Path(src).name.startswith(".step_3.tmp-"):
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_moving_the_new_copy_in)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(saved.parent, 3, model, tok, {"stage": "base"})
    monkeypatch.setattr(ckpt.os, "replace", real)
    assert not saved.exists() and len(list(saved.parent.glob(".step_3.old-*"))) == 1
    ckpt.save_checkpoint(saved.parent, 1, model, tok, {"stage": "base"})  # any later save puts it back
    assert sha256(saved / "model.safetensors") == before and ckpt.list_steps(saved.parent) == [1, 3]
    assert not list(saved.parent.glob(".step_*"))


def test_a_checkpoint_without_its_tokenizer_says_it_is_incomplete(saved: Path):
    """Not "train one with tok-train": the checkpoint's own tokenizer is what is missing."""
    shutil.rmtree(saved / "tokenizer")
    with pytest.raises(DataError, match=r"is not a complete checkpoint \(missing tokenizer\)"):
        ckpt.load_checkpoint_dir(saved)
