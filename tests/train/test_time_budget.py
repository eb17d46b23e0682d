"""--time-budget: the horizon comes from measured throughput, is fixed once, and survives a resume bit-exactly."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from picochat import checkpoint as ckpt
from picochat.cli import main
from picochat.train import loop

TINY = ["base-train", "--preset", "cpu-tiny", "--dtype", "fp32", "--eval-every", "-1", "--sample-every", "-1"]


def records(home: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (home / "logs" / f"{name}.jsonl").read_text().splitlines()]


def losses(home: Path, name: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(home, name) if "loss" in r}


def test_time_budget_sets_the_horizon_and_resume_keeps_it(tiny_home, monkeypatch):
    # The loop's clock advances a quarter second per reading, so every step lasts the same and the
    # horizon does not depend on how busy the machine is (a real clock made this test flaky under load).
    clock = itertools.count(0.0, 0.25)
    monkeypatch.setattr(loop, "time", SimpleNamespace(time=lambda: next(clock)))
    args = TINY + ["--time-budget", "0.25", "--save-every", "5", "--keep-last", "100"]
    assert main(args + ["--tag", "budget"]) == 0
    recs = [r for r in records(tiny_home, "base-budget") if "loss" in r]
    fixed_at = next(r["step"] for r in recs if r["num_iterations"] is not None)
    horizon = recs[-1]["num_iterations"]
    assert all(r["num_iterations"] is None for r in recs if r["step"] < fixed_at)
    assert all(r["num_iterations"] == horizon for r in recs if r["step"] >= fixed_at)
    assert recs[-1]["step"] == horizon and len(recs) == horizon and 20 < horizon < 100
    meta = json.loads((ckpt.run_dir("base", "budget") / f"step_{horizon}" / "meta.json").read_text())
    assert meta["num_iterations"] == horizon

    # Resume from the first checkpoint after the horizon was fixed: same horizon, same weights, same losses.
    run = ckpt.run_dir("base", "budget")
    steps = ckpt.list_steps(run)
    cut = next(s for s in steps if s >= fixed_at)
    assert cut < horizon, (cut, horizon)
    straight = load_file(str(run / f"step_{horizon}" / "model.safetensors"))
    straight_losses = losses(tiny_home, "base-budget")
    for s in steps:
        if s > cut:
            shutil.rmtree(run / f"step_{s}")
    assert main(args + ["--tag", "budget", "--resume"]) == 0
    resumed = load_file(str(run / f"step_{horizon}" / "model.safetensors"))
    assert ckpt.list_steps(run)[-1] == horizon
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    assert losses(tiny_home, "base-budget") == straight_losses


def test_time_budget_of_seconds_ends_the_run(tiny_home, monkeypatch):
    # The loop's clock moves only inside a training step, 40 ms per step, so the run's whole time is
    # its steps' and the horizon is exact whatever the machine's load (a real clock made this flaky).
    now = [0.0]
    monkeypatch.setattr(loop, "time", SimpleNamespace(time=lambda: now[0]))
    train_step = loop.Trainer._train_step

    def step_of_40ms(self, step):
        now[0] += 0.04
        return train_step(self, step)
    monkeypatch.setattr(loop.Trainer, "_train_step", step_of_40ms)
    assert main(TINY + ["--time-budget", "0.02", "--tag", "short"]) == 0  # 1.2 s
    recs = [r for r in records(tiny_home, "base-short") if "loss" in r]
    fixed_at = next(r["step"] for r in recs if r["num_iterations"] is not None)
    assert fixed_at >= 8 and all(r["num_iterations"] is None for r in recs if r["step"] < fixed_at)
    # the horizon, fixed once, spends the budget: every step that fits in 1.2 s and not one more
    assert recs[-1]["step"] == recs[-1]["num_iterations"] == len(recs) == 30
    assert now[0] == pytest.approx(1.2)
