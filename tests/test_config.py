"""config.resolve's precedence (command line > section > preset > defaults) and the flag blocks every
command shares (--device/--dtype, --stage/--tag/--step), checked on the real commands' parsers."""

from __future__ import annotations

import argparse
import importlib

import pytest

from picochat.cli import COMMANDS
from picochat.config import PRESETS, STAGES, resolve
from picochat.errors import ConfigError

DEFAULTS = {"depth": 12, "device_batch_size": 32, "eval_every": 250, "mix_scale": "full", "num_steps": 100}


def test_command_line_then_preset_then_defaults():
    got = resolve(argparse.Namespace(preset="cpu", depth=6, eval_every=None, device_batch_size=None,
                                     mix_scale=None, num_steps=None), dict(DEFAULTS))
    assert got.depth == 6  # given on the command line
    assert got.device_batch_size == PRESETS["cpu"]["device_batch_size"]  # from the preset
    assert got.num_steps == 100  # neither: the command's default
    plain = resolve(argparse.Namespace(preset=None), dict(DEFAULTS))
    assert vars(plain) == {"preset": None, **DEFAULTS}


def test_a_section_wins_over_the_top_level_and_section_only_ignores_the_top_level():
    sft = resolve(argparse.Namespace(preset="cpu"), dict(DEFAULTS), section="sft")
    assert sft.device_batch_size == PRESETS["cpu"]["sft"]["device_batch_size"] != PRESETS["cpu"]["device_batch_size"]
    assert sft.depth == PRESETS["cpu"]["depth"]  # not in the section: the top level's
    rl = resolve(argparse.Namespace(preset="cpu"), dict(DEFAULTS), section="rl", section_only=True)
    assert rl.num_steps == PRESETS["cpu"]["rl"]["num_steps"]
    assert rl.depth == 12  # the top level is ignored
    explicit = resolve(argparse.Namespace(preset="cpu", device_batch_size=3), dict(DEFAULTS), section="sft")
    assert explicit.device_batch_size == 3  # the command line beats the section


def test_unknown_preset_is_one_line_error_naming_the_flag():
    with pytest.raises(ConfigError, match=r"--preset 'cpu2' is unknown; choose one of \["):
        resolve(argparse.Namespace(preset="cpu2"), dict(DEFAULTS))


def test_every_preset_section_names_flags_its_command_has():
    """A typo in a preset key would silently do nothing: every key must be a flag of its command."""
    def dests(module: str) -> set[str]:
        p = argparse.ArgumentParser()
        importlib.import_module(module).add_arguments(p)
        return {a.dest for a in p._actions}

    base, mid, sft, rl = (dests(COMMANDS[c][0]) for c in ("base-train", "mid-train", "sft", "rl"))
    for name, preset in PRESETS.items():
        for key in preset:
            if key in ("mid", "sft", "rl", "speedrun", "recipe"):
                continue
            assert key in base | {"vocab_size", "max_chars", "doc_cap"}, (name, key)
        for section, flags in (("mid", mid), ("sft", sft), ("rl", rl)):
            for key in preset.get(section, {}):
                assert key in flags, (name, section, key)


@pytest.mark.parametrize("command", ["chat", "serve", "chat-eval", "chat-probe", "export", "base-loss", "base-eval"])
def test_checkpoint_commands_share_one_stage_tag_step_block(command):
    p = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[command][0]).add_arguments(p)
    actions = {a.dest: a for a in p._actions}
    assert actions["tag"].default is None and actions["step"].default is None and actions["step"].type is int
    if "stage" in actions:
        assert tuple(actions["stage"].choices) == STAGES
        assert p.parse_args(["--stage", "mid"]).stage == "mid"
        with pytest.raises(SystemExit):
            p.parse_args(["--stage", "pre"])


@pytest.mark.parametrize("command", ["chat", "serve", "chat-eval", "chat-probe", "base-loss", "base-eval",
                                     "base-train", "mid-train", "sft", "rl"])
def test_model_commands_share_one_device_dtype_block(command):
    p = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[command][0]).add_arguments(p)
    args = p.parse_args([])
    assert (args.device, args.dtype) == ("auto", "auto")
    assert p.parse_args(["--device", "cpu", "--dtype", "fp32"]).dtype == "fp32"
