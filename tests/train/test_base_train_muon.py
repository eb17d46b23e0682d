"""base-train with the optional Muon rules and schedules: it learns, logs the schedules, and resumes bit-exactly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from picochat import checkpoint as ckpt
from picochat.cli import main
from tests.train.test_base_train import TINY, final_weights, losses

RECIPE = ["--muon-orthogonalizer", "polar_express", "--muon-eq", "--muon-plus", "--normuon", "--cautious-wd",
          "--muon-weight-decay", "0.2", "--weight-decay-schedule", "cosine", "--momentum-end", "0.97",
          "--momentum-final", "0.9", "--warmdown-ratio", "0.5", "--momentum-warmup-steps", "2"]


def test_the_2026_muon_recipe_trains_and_resumes_bit_exactly(tiny_home):
    args = TINY + RECIPE + ["--num-iterations", "8", "--save-every", "4", "--keep-last", "5"]
    assert main(args + ["--tag", "straight"]) == 0
    assert main(args + ["--tag", "cut"]) == 0
    shutil.rmtree(ckpt.run_dir("base", "cut") / "step_8")
    assert main(args + ["--tag", "cut", "--resume"]) == 0
    a, b = final_weights("straight", 8), final_weights("cut", 8)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert losses(tiny_home, "straight") == losses(tiny_home, "cut")
    records = [json.loads(line) for line in (tiny_home / "logs" / "base-straight.jsonl").read_text().splitlines()]
    momentum = [r["momentum"] for r in records if "loss" in r]
    assert momentum[:3] == pytest.approx([0.85, 0.91, 0.97]) and momentum[-1] < 0.97  # warmup, then down in the LR warmdown
    state = ckpt.load_training_state(ckpt.run_dir("base", "straight") / "step_8")
    muon_state = state["optimizers"][1]
    assert all("second_moment" in entry for entry in muon_state["state"].values())
    (group,) = muon_state["param_groups"]
    assert group["orthogonalizer"] == "polar_express" and group["cautious_weight_decay"]
    assert 0 < group["weight_decay"] < 0.2 == group["initial_weight_decay"]  # the cosine has begun
