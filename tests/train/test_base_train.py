"""base-train end to end on cpu-tiny: learning, exact resume (also after SIGKILL), clear errors."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from picochat import checkpoint as ckpt
from picochat.cli import main
from picochat.data.loader import LOADERS
from picochat.train import loop

TINY = ["base-train", "--preset", "cpu-tiny", "--dtype", "fp32", "--eval-every", "-1", "--sample-every", "-1"]


def losses(home: Path, tag: str) -> dict[int, float]:
    """Step -> loss; a step logged twice (before a crash and after resume) keeps the last record."""
    out = {}
    for line in (home / "logs" / f"base-{tag}.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def final_weights(tag: str, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.run_dir("base", tag) / f"step_{step}" / "model.safetensors"))


def test_loss_decreases_and_checkpoint_is_complete(tiny_home):
    assert main(TINY + ["--num-iterations", "30", "--tag", "learn"]) == 0
    seq = losses(tiny_home, "learn")
    assert len(seq) == 30
    first, last = sum(seq[s] for s in range(1, 4)) / 3, sum(seq[s] for s in range(28, 31)) / 3
    assert last < first - 0.5, (first, last)
    step_dir = ckpt.run_dir("base", "learn") / "step_30"
    for name in ("model.safetensors", "config.json", "meta.json", "state.pt", "tokenizer/tokenizer.json"):
        assert (step_dir / name).exists(), name
    meta = json.loads((step_dir / "meta.json").read_text())
    assert meta["step"] == 30 and meta["stage"] == "base" and "val_bpb" in meta["metrics"]
    assert 0 < meta["metrics"]["val_bpb"] < 20


@pytest.mark.parametrize("loader", LOADERS)
def test_resume_is_bit_exact(tiny_home, loader):
    args = TINY + ["--num-iterations", "12", "--save-every", "4", "--keep-last", "5", "--loader", loader]
    straight, cut = f"straight-{loader}", f"cut-{loader}"
    assert main(args + ["--tag", straight]) == 0
    # Interrupted run: stop after step 8 by running a shorter horizon with the same schedule is not
    # the same run, so instead train to 12 with saves, delete the later checkpoints and resume.
    assert main(args + ["--tag", cut]) == 0
    run = ckpt.run_dir("base", cut)
    for step in (8, 12):
        shutil.rmtree(run / f"step_{step}")
    # A half-written save left by a crash must be ignored.
    junk = run / ".step_8.tmp-12345"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"partial")
    assert main(args + ["--tag", cut, "--resume"]) == 0
    a, b = final_weights(straight, 12), final_weights(cut, 12)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert losses(tiny_home, straight) == losses(tiny_home, cut)
    assert not junk.exists()


def test_eta_after_a_resume_uses_the_step_time_measured_since(tiny_home, monkeypatch):
    """ETA = steps left x this process's mean step time (+ the saves left). A resumed run restores its train
    time, which holds the earlier process's steps: dividing that by the steps timed since the resume
    overstated it."""
    clock = itertools.count(0.0, 0.5)  # every reading of the loop's clock is half a second later
    monkeypatch.setattr(loop, "time", SimpleNamespace(time=lambda: next(clock)))
    args = TINY + ["--num-iterations", "12", "--save-every", "4", "--keep-last", "5", "--tag", "eta"]
    assert main(args) == 0
    for step in (8, 12):
        shutil.rmtree(ckpt.run_dir("base", "eta") / f"step_{step}")
    assert main(args + ["--resume"]) == 0
    records = [json.loads(line) for line in (tiny_home / "logs" / "base-eta.jsonl").read_text().splitlines()]
    timed = [r for r in records if r.get("eta_s") is not None]
    # Each process's first 3 steps pay for warm-up and compilation, a resumed one's too: the resumed
    # process (steps 5..12) times its steps from the fourth on.
    starts = [i for i, r in enumerate(records) if r.get("step") == 5 and "loss" in r]
    assert len(starts) == 2  # step 5 in the first process and again in the resumed one
    resumed = records[starts[1]:]
    assert [r["step"] for r in resumed if "loss" in r and r.get("eta_s") is None] == [5, 6, 7]
    # The records say which steps were timed (the report's tokens/s and MFU read them).
    assert [r["step"] for r in resumed if "loss" in r and not r["timed"]] == [5, 6, 7]
    assert [r["step"] for r in records[:starts[1]] if "loss" in r and not r["timed"]] == [1, 2, 3]
    assert [r["step"] for r in timed][-5:] == list(range(8, 13))
    # Saves (at 4 and 8, each after its step's record, and at the end) count once this process has
    # timed one: a save reads this clock twice more than a step does, 1 s.
    for process, first_save in ((records[:starts[1]], 4), (resumed, 8)):
        for r in (r for r in process if r.get("eta_s") is not None):
            saves_left = sum(s >= r["step"] for s in (4, 8)) + 1 if r["step"] > first_save else 0
            assert r["eta_s"] == pytest.approx((12 - r["step"]) * r["dt"] + saves_left * 1.0), r


def test_wall_time_counts_every_process_of_a_resumed_run(tiny_home, monkeypatch):
    """meta's wall_time_s (the report's training time) is the loop time of the whole training, the time
    before the resume included; it used to hold only the resumed process's."""
    clock = itertools.count(0.0, 0.5)
    monkeypatch.setattr(loop, "time", SimpleNamespace(time=lambda: next(clock)))
    args = TINY + ["--num-iterations", "12", "--save-every", "4", "--keep-last", "5", "--tag", "wall"]
    assert main(args) == 0
    run = ckpt.run_dir("base", "wall")
    straight = ckpt.read_json_object(run / "step_12" / "meta.json")["metrics"]["wall_time_s"]
    for step in (8, 12):
        shutil.rmtree(run / f"step_{step}")
    before = ckpt.load_training_state(run / "step_4")["loop"]["elapsed_s"]
    assert before > 0
    assert main(args + ["--resume"]) == 0
    resumed = ckpt.read_json_object(run / "step_12" / "meta.json")["metrics"]["wall_time_s"]
    assert resumed == ckpt.load_training_state(run / "step_12")["loop"]["elapsed_s"]
    # On the fake clock every step takes as long in either process: the resumed training's total is the
    # straight one's (the resumed process alone took about straight - before).
    assert resumed == pytest.approx(straight, rel=0.1) and resumed > straight - before + 1


def test_resume_past_the_horizon_is_a_clear_error(tiny_home, capsys):
    """A checkpoint beyond the horizon used to train on forever with a negative learning rate."""
    args = TINY + ["--save-every", "4", "--keep-last", "5", "--tag", "past"]
    assert main(args + ["--num-iterations", "8"]) == 0
    assert main(args + ["--num-iterations", "6", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "step_8 is at step 8, past this run's horizon of 6 steps" in err and "--num-iterations" in err
    assert ckpt.list_steps(ckpt.run_dir("base", "past")) == [4, 8]  # nothing written
    assert main(args + ["--num-iterations", "8", "--resume"]) == 0  # at the horizon: evaluates and saves again
    assert ckpt.list_steps(ckpt.run_dir("base", "past")) == [4, 8]


def test_a_fresh_run_on_a_used_tag_replaces_the_earlier_runs_checkpoints(tiny_home, capsys):
    """Its first save removes the earlier run's higher steps, so --resume can only continue this run."""
    args = TINY + ["--save-every", "4", "--keep-last", "2", "--tag", "again"]
    assert main(args + ["--num-iterations", "12"]) == 0
    run = ckpt.run_dir("base", "again")
    assert ckpt.list_steps(run) == [8, 12]
    capsys.readouterr()
    assert main(args + ["--num-iterations", "6"]) == 0
    assert "holds checkpoints of an earlier run (steps 8, 12)" in capsys.readouterr().out
    assert ckpt.list_steps(run) == [4, 6]
    assert ckpt.read_json_object(run / "step_6" / "meta.json")["num_iterations"] == 6


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_exact(tiny_home):
    """Kill the training process hard (possibly mid-save), resume, and match an uninterrupted run."""
    args = TINY + ["--num-iterations", "40", "--save-every", "5", "--keep-last", "3"]
    assert main(args + ["--tag", "straight"]) == 0
    env = {**os.environ, "PICOCHAT_HOME": str(tiny_home)}
    proc = subprocess.Popen([sys.executable, "-m", "picochat", *args, "--tag", "killed"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = ckpt.run_dir("base", "killed")
    deadline = time.time() + 120
    while time.time() < deadline and not ckpt.list_steps(run):
        time.sleep(0.01)
    # Kill as soon as a temp save directory shows up after the first checkpoint: mid-save if we can.
    while time.time() < deadline and proc.poll() is None and not list(run.glob(".step_*.tmp-*")):
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.list_steps(run), "no checkpoint was written before the kill"
    assert main(args + ["--tag", "killed", "--resume"]) == 0
    a, b = final_weights("straight", 40), final_weights("killed", 40)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert losses(tiny_home, "straight") == losses(tiny_home, "killed")


def test_resume_refuses_another_tokenizer(tiny_home):
    from picochat.tokenizer import Tokenizer
    from tests.train.conftest import make_documents

    args = TINY + ["--num-iterations", "4", "--tag", "tok"]
    assert main(args) == 0
    Tokenizer.train(make_documents(100, seed=9), vocab_size=300).save(tiny_home / "tokenizer")
    assert main(args + ["--resume", "--num-iterations", "8"]) == 2


def test_bad_flags_are_clear_errors(tiny_home, capsys):
    assert main(TINY + ["--total-batch-size", "100"]) == 2
    assert "--total-batch-size 100 must be a multiple" in capsys.readouterr().err
    assert main(TINY + ["--eval-tokens", "10"]) == 2
    assert "--eval-tokens 10" in capsys.readouterr().err
    assert main(TINY + ["--data-dir", str(tiny_home / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_base_loss_reports_bpb_and_samples(tiny_home):
    assert main(TINY + ["--num-iterations", "4", "--tag", "bl"]) == 0
    assert main(["base-loss", "--tag", "bl", "--split-tokens", "1024", "--device-batch-size", "4",
                 "--max-new-tokens", "4", "--dtype", "fp32"]) == 0
    out = json.loads((tiny_home / "eval" / "base_loss_bl_step4.json").read_text())
    assert 0 < out["train_bpb"] < 20 and 0 < out["val_bpb"] < 20
    assert out["samples"][0]["prompt"] == "The capital of France is"
    assert main(["base-loss", "--tag", "bl", "--split-tokens", "8"]) == 2  # too few tokens: error, not inf


PLAN_TINY = ["base-train", "--preset", "cpu-tiny", "--dtype", "fp32", "--eval-every", "-1", "--sample-every", "-1",
        "--num-iterations", "2"]


def test_training_refuses_a_batch_that_cannot_fit_and_names_one_that_does(tiny_home, monkeypatch, capsys):
    from picochat import plan
    from picochat.model.gpt import GPTConfig
    from picochat.plan import Shape, memory_terms

    # A device just big enough for device batch 2 of cpu-tiny, and no headroom to keep the numbers small.
    config = GPTConfig.from_depth(2, 320, aspect_ratio=32, head_dim=32, max_seq_len=128)
    need2 = sum(memory_terms(Shape.from_config(config, 2, on_gpu=False, bf16=False, total_batch_tokens=1024)).values())
    monkeypatch.setattr(plan, "headroom", lambda capacity, on_gpu: 0)
    monkeypatch.setattr(plan, "local_capacity", lambda device: (int(need2 * 1.2), "the test device"))
    assert main([*PLAN_TINY, "--device-batch-size", "8", "--total-batch-size", "1024", "--tag", "big"]) == 2
    err = capsys.readouterr().err
    assert "--device-batch-size 8 needs" in err and "use --device-batch-size 2" in err and "--no-plan-check" in err
    assert not (tiny_home / "checkpoints" / "base" / "big").exists()
    assert main([*PLAN_TINY, "--device-batch-size", "2", "--total-batch-size", "1024", "--tag", "ok"]) == 0
    assert main([*PLAN_TINY, "--device-batch-size", "8", "--total-batch-size", "1024", "--tag", "forced",
                 "--no-plan-check"]) == 0


def test_wall_clock_saves_keep_the_last_k(tiny_home):
    # A save interval of 6 ms: every step is due; only the newest 2 survive, then the final one.
    assert main([*PLAN_TINY[:-1], "5", "--save-every-minutes", "0.0001", "--keep-last", "2", "--tag", "wall"]) == 0
    assert ckpt.list_steps(ckpt.run_dir("base", "wall")) == [4, 5]


def test_gpu_presets_save_every_30_minutes_in_every_stage():
    from picochat.train.base_train import BaseTrainConfig
    from picochat.train.mid_train import MidConfig
    from picochat.train.sft import SFTConfig

    for preset in ("d20", "d26", "d32"):
        for stage in (BaseTrainConfig, MidConfig, SFTConfig):
            cfg = stage.defaults(preset=preset)
            assert cfg.save_every_minutes == 30.0 and cfg.keep_last == 2


def test_d20_at_16_processes_lowers_the_preset_batch_or_explains_the_flag():
    import dataclasses

    from picochat.errors import ConfigError
    from picochat.train.base_train import BaseTrainConfig, check_batch

    preset = BaseTrainConfig.defaults(preset="d20")
    assert not preset.batch_from_flag and preset.device_batch_size == 32
    assert check_batch(preset, 16) == 1 and preset.device_batch_size == 16
    assert check_batch(dataclasses.replace(preset, device_batch_size=32), 8) == 1
    given = BaseTrainConfig.defaults(preset="d20", device_batch_size=32)
    assert given.batch_from_flag
    with pytest.raises(ConfigError, match="with 16 process\\(es\\) use --device-batch-size 16"):
        check_batch(given, 16)
