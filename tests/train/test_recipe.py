"""The recipe bundles: how --recipe, a preset's own recipe and explicit flags combine; the batch rule and
its LR / weight-decay transfer; base-train with the 2026 bundle learns and resumes bit-exactly."""

from __future__ import annotations

import argparse
import json
import math
import shutil

import pytest
import torch

from picochat import checkpoint as ckpt
from picochat.cli import main
from picochat.config import RECIPES
from picochat.errors import ConfigError
from picochat.plan import B_REF, auto_batch, batch_growth
from picochat.train import base_train
from picochat.train.mid_train import MidConfig
from picochat.train.sft import SFTConfig
from tests.train.test_base_train import TINY, final_weights, losses


def flags(*argv: str) -> base_train.BaseTrainConfig:
    p = argparse.ArgumentParser()
    base_train.add_arguments(p)
    return base_train.BaseTrainConfig.from_args(p.parse_args(list(argv)))


def test_recipe_precedence():
    classic = flags("--preset", "d20")
    assert (classic.muon_orthogonalizer, classic.loader, classic.value_embeds) == ("newton_schulz", "packed", None)
    assert flags("--preset", "cpu", "--recipe", "2025").muon_orthogonalizer == "newton_schulz"
    cpu = flags("--preset", "cpu")  # the 2026 recipe with the preset's own loader and unscaled LRs
    assert (cpu.muon_orthogonalizer, cpu.value_embeds, cpu.loader, cpu.batch_lr_scale, cpu.warmup_steps,
            cpu.warmdown_ratio, cpu.tail_keep) == ("polar_express", True, "aligned", "none", 10, 1.0, 0.1)
    modern = flags("--preset", "cpu", "--recipe", "2026")
    assert modern.muon_orthogonalizer == "polar_express" and modern.loader == "bestfit" and modern.value_embeds
    assert modern.total_batch_size == 4096 and modern.depth == 4  # sizes stay the preset's
    assert modern.warmup_steps == RECIPES["2026"]["warmup_steps"]  # a recipe on the command line wins over the preset
    own = flags("--preset", "gpt2")  # a preset's own recipe yields to the preset's keys
    assert own.muon_orthogonalizer == "polar_express" and own.total_batch_size == -1
    assert flags("--preset", "gpt2", "--loader", "packed", "--no-smear").loader == "packed"
    assert flags("--preset", "gpt2", "--no-smear").smear is False  # an explicit flag wins over everything
    assert flags("--preset", "gpt2", "--recipe", "2025").muon_orthogonalizer == "newton_schulz"
    with pytest.raises(ConfigError, match="--recipe '1999' is unknown"):
        base_train.BaseTrainConfig.defaults(recipe="1999")
    # chat stages take no recipe: their sections keep the commands' defaults
    mid = MidConfig.defaults(preset="gpt2")
    assert mid.matrix_lr == 0.02 and mid.source == "auto"


def test_tail_keep_applies_to_aligned_rows_only():
    def options(*argv):
        p = argparse.ArgumentParser()
        base_train.add_arguments(p)
        args = p.parse_args(list(argv))
        given = args.tail_keep is not None
        return base_train.loader_options(base_train.BaseTrainConfig.from_args(args), given)

    assert options("--preset", "cpu") == {"tail_keep": flags("--preset", "cpu").tail_keep}
    assert options("--preset", "cpu", "--tail-keep", "0.3") == {"tail_keep": 0.3}
    assert options("--preset", "cpu", "--loader", "packed") == {}  # the preset's share goes with its rows
    assert options("--loader", "bestfit", "--tail-keep", "1") == {}
    with pytest.raises(ConfigError, match="^--tail-keep applies to --loader aligned, not packed; drop --tail-keep"):
        options("--preset", "cpu", "--loader", "packed", "--tail-keep", "0.5")
    with pytest.raises(ConfigError, match="^--tail-keep 1.5: give a share between 0"):
        options("--preset", "cpu", "--tail-keep", "1.5")


def test_a_horizon_on_the_command_line_replaces_the_presets_time_budget():
    base = flags

    assert base("--preset", "cpu").time_budget == 15.0
    assert base("--preset", "cpu", "--num-iterations", "50").time_budget == -1.0
    assert base("--preset", "cpu", "--target-flops", "1e12").time_budget == -1.0
    assert base("--preset", "cpu", "--num-iterations", "50", "--time-budget", "2").time_budget == 2.0
    assert base("--preset", "d20").time_budget == -1.0
    # picochat plan follows the same rule
    from picochat import plan

    def planned(*argv):
        p = argparse.ArgumentParser()
        plan.add_arguments(p)
        return plan.build_plan(plan.PlanConfig.from_args(p.parse_args(list(argv))))["steps"]

    assert planned("--preset", "cpu", "--num-iterations", "50") == 50
    assert planned("--preset", "cpu") > 10_000  # 15 minutes on the default GPU
    # the chat stages of the cpu preset run their epochs, not pretraining's budget
    for stage in (MidConfig, SFTConfig):
        assert stage.defaults(preset="cpu").time_budget == -1.0


def test_automatic_batch_and_its_lr_and_weight_decay_transfer():
    gpt2 = flags("--preset", "gpt2")
    config = gpt2.model_config(32768)
    growth = batch_growth(gpt2, config)
    assert 6 < growth < 7  # depth 24 has ~6.6x the scaling parameters of depth 12
    assert auto_batch(growth) == 2 ** 20 and auto_batch(1.0) == B_REF
    lr, wd = base_train.batch_and_scales(gpt2, config)
    assert gpt2.total_batch_size == 2 ** 20
    assert lr == pytest.approx(math.sqrt(2)) and wd == pytest.approx(math.sqrt(2) / growth)
    cpu = flags("--preset", "cpu", "--recipe", "2026")
    lr, _ = base_train.batch_and_scales(cpu, cpu.model_config(8192))
    assert lr == pytest.approx(math.sqrt(4096 / 2 ** 19))  # 4K-token steps shrink every LR ~11x
    assert base_train.batch_and_scales(flags("--preset", "cpu"), cpu.model_config(8192)) == (1.0, 1.0)
    with pytest.raises(ConfigError, match="--embedding-betas"):
        base_train.adamw_groups(flags("--embedding-betas", "0.9"), 1.0)


def test_the_2026_bundle_trains_and_resumes_bit_exactly(tiny_home):
    args = TINY + ["--recipe", "2026", "--num-iterations", "8", "--save-every", "4", "--keep-last", "5",
                   "--warmup-steps", "2", "--batch-lr-scale", "none"]
    assert main(args + ["--tag", "straight"]) == 0
    assert main(args + ["--tag", "cut"]) == 0
    shutil.rmtree(ckpt.run_dir("base", "cut") / "step_8")
    assert main(args + ["--tag", "cut", "--resume"]) == 0
    a, b = final_weights("straight", 8), final_weights("cut", 8)
    assert "value_embeds.1.weight" in a and "smear_lambda" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    seq = losses(tiny_home, "straight")
    assert seq == losses(tiny_home, "cut")
    assert seq[8] < seq[1]
    config = json.loads((ckpt.run_dir("base", "straight") / "step_8" / "config.json").read_text())
    assert config["window_pattern"] == "SSSL" and config["init"] == "2026" and config["rope_theta"] == 100000.0
