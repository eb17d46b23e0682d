"""base-train --fp8 end to end on a CPU (torch._scaled_mm runs there, slowly): it learns, stays close to
full precision, resumes bit-exactly, and its checkpoints are ordinary ones."""

from __future__ import annotations

import shutil

import torch

from picochat import checkpoint as ckpt
from picochat.cli import main
from picochat.model import fp8
from tests.train.test_base_train import TINY, final_weights, losses

WIDE = ["--depth", "2", "--aspect-ratio", "64", "--head-dim", "64"]  # width 128: the block layers convert


def test_base_train_fp8_learns_tracks_full_precision_and_resumes_bit_exactly(tiny_home, capsys):
    args = TINY + WIDE + ["--num-iterations", "8", "--save-every", "4", "--keep-last", "5"]
    assert main(args + ["--tag", "plain"]) == 0
    assert main(args + ["--tag", "straight", "--fp8", "on"]) == 0
    assert "fp8: 12 of 13 linear layers train in float8" in capsys.readouterr().out
    assert main(args + ["--tag", "cut", "--fp8", "on"]) == 0
    shutil.rmtree(ckpt.run_dir("base", "cut") / "step_8")
    assert main(args + ["--tag", "cut", "--fp8", "on", "--resume"]) == 0
    a, b = final_weights("straight", 8), final_weights("cut", 8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    seq, ref = losses(tiny_home, "straight"), losses(tiny_home, "plain")
    assert seq == losses(tiny_home, "cut")
    assert seq[8] < seq[1] - 0.3  # it learns
    assert abs(seq[8] - ref[8]) < 0.1 and seq != ref  # close to full precision, and not it
    model, _, _ = ckpt.load_checkpoint_dir(ckpt.run_dir("base", "straight") / "step_8", "cpu")
    assert all(type(m) is not fp8.Float8Linear for m in model.modules())  # checkpoints know nothing of fp8
    assert torch.isfinite(model(torch.randint(0, 320, (1, 16)))).all()
