"""config.resolve's precedence (command line > section > preset > defaults) and the flag blocks every
command shares (--device/--dtype, --stage/--tag/--step), checked on the real commands' parsers."""

from __future__ import annotations

import argparse
import dataclasses
import importlib

import pytest

from picochat.cli import COMMANDS
from picochat.config import PRESETS, STAGES, DeviceOptions, _help_line, resolve
from picochat.data.commands import DownloadConfig, PrepareConfig
from picochat.errors import ConfigError
from picochat.eval.chat_eval import ChatEvalConfig
from picochat.eval.core_command import CoreEvalConfig
from picochat.plan import PlanConfig
from picochat.tokenizer.commands_train import TokTrainConfig
from picochat.train.base_train import BaseTrainConfig
from picochat.train.mid_train import MidConfig
from picochat.train.rl import RLConfig
from picochat.train.sft import SFTConfig

STAGE_CONFIGS = {"tok-train": TokTrainConfig, "base-train": BaseTrainConfig, "mid-train": MidConfig,
                 "sft": SFTConfig, "rl": RLConfig, "plan": PlanConfig}

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


def test_every_preset_key_is_a_field_of_the_stage_it_configures():
    """A typo in a preset key would silently do nothing: every key must be a field of its stage's options
    (the top level: tokenizer training or pretraining; each section: its stage)."""
    def names(*configs) -> set[str]:
        return {f.name for c in configs for f in dataclasses.fields(c)}

    top = names(TokTrainConfig, BaseTrainConfig)
    for name, preset in PRESETS.items():
        assert set(preset) - {"mid", "sft", "rl", "speedrun"} <= top, name
        for section, stage in (("mid", MidConfig), ("sft", SFTConfig), ("rl", RLConfig)):
            assert set(preset.get(section, {})) <= names(stage), (name, section)
        for stage in (TokTrainConfig, BaseTrainConfig, MidConfig, SFTConfig, RLConfig, PlanConfig):
            stage.defaults(preset=name)  # and each resolves to valid options


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
    stage = STAGE_CONFIGS.get(command)
    args = p.parse_args([]) if stage is None else stage.from_args(p.parse_args([]))
    assert (args.device, args.dtype) == ("auto", "auto")
    assert p.parse_args(["--device", "cpu", "--dtype", "fp32"]).dtype == "fp32"
    helps = {a.dest: a.help for a in p._actions}
    assert helps["dtype"] == _help_line(next(f for f in dataclasses.fields(DeviceOptions) if f.name == "dtype"))


# ---- typed stage options ----------------------------------------------------------------------------

@pytest.mark.parametrize("command", sorted(STAGE_CONFIGS))
def test_a_stages_flags_and_help_come_from_its_dataclass(command):
    """One flag per field (the same name, type and choices), the field's default in the help, and the
    parsed defaults resolved to exactly the dataclass's defaults when no preset is given."""
    stage = STAGE_CONFIGS[command]
    p = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[command][0]).add_arguments(p)
    actions = {a.dest: a for a in p._actions if a.dest not in ("help", "preset", "recipe")}
    flags = {f.name: f for f in dataclasses.fields(stage) if f.metadata["cli"]}
    assert set(actions) == set(flags)
    for name, f in flags.items():
        action = actions[name]
        assert "--" + name.replace("_", "-") in action.option_strings
        assert action.default is None  # so a preset can tell a flag given from one left to it
        assert action.help.startswith(f.metadata["help"].replace("%", "%%"))
        if f.metadata["choices"]:
            assert tuple(action.choices) == f.metadata["choices"]
        if f.default is not None and not isinstance(f.default, bool):
            assert "default" in action.help, name
    resolved = stage.from_args(p.parse_args([]))
    assert isinstance(resolved, stage)
    for f in dataclasses.fields(stage):
        if f.name != "batch_from_flag":
            assert getattr(resolved, f.name) == f.default, f.name


@pytest.mark.parametrize(("stage", "field", "value"), [
    (SFTConfig, "mix_scale", "huge"), (MidConfig, "source", "web"), (BaseTrainConfig, "loader", "random"),
    (BaseTrainConfig, "muon_orthogonalizer", "svd"), (RLConfig, "from_stage", "base"),
    (BaseTrainConfig, "compile", "yes"), (PlanConfig, "gpu", "TPUv5")])
def test_an_enumeration_outside_its_choices_is_a_one_line_error_naming_the_flag(stage, field, value):
    with pytest.raises(ConfigError) as e:
        stage.defaults(**{field: value})
    message = str(e.value)
    assert message.startswith(f"--{field.replace('_', '-')} {value!r} is not one of") and "\n" not in message


@pytest.mark.parametrize(("stage", "field"), [
    (BaseTrainConfig, "device_batch_size"), (MidConfig, "device_batch_size"), (SFTConfig, "device_batch_size"),
    (SFTConfig, "examples_per_step"), (RLConfig, "device_batch_size"), (PlanConfig, "device_batch_size"),
    (BaseTrainConfig, "max_seq_len")])
def test_a_size_below_its_minimum_is_a_one_line_error_naming_the_flag(stage, field):
    with pytest.raises(ConfigError) as e:  # a zero batch used to end in a ZeroDivisionError traceback
        stage.defaults(**{field: 0})
    assert str(e.value) == f"--{field.replace('_', '-')} must be >= 1, got 0"
    assert getattr(stage.defaults(**{field: 1}), field) == 1


def test_an_enumeration_from_a_preset_is_checked_too(monkeypatch):
    monkeypatch.setitem(PRESETS, "broken", {"loader": "shuffled"})
    with pytest.raises(ConfigError, match="--loader 'shuffled' is not one of packed, bestfit, aligned"):
        BaseTrainConfig.defaults(preset="broken")


def test_presets_override_fields_and_a_section_gives_a_stage_its_own_values():
    base, mid, sft, rl = (c.defaults(preset="cpu") for c in (BaseTrainConfig, MidConfig, SFTConfig, RLConfig))
    assert (base.depth, base.device_batch_size, base.time_budget) == (4, 16, 15.0)
    assert (mid.mix_scale, mid.time_budget, mid.total_batch_size) == ("cpu", -1.0, 4096)
    assert (sft.device_batch_size, sft.examples_per_step) == (4, 16)
    assert (rl.num_steps, rl.save_every, rl.matrix_lr) == (16, 8, 0.02)  # rl: its section only
    assert not base.batch_from_flag and BaseTrainConfig.defaults(device_batch_size=3).batch_from_flag
    # the cpu preset takes the 2026 recipe less what lost at its size; --recipe 2026 brings all of it back
    assert (base.value_embeds, base.layer_lambdas, base.qk_scale, base.loader) == (True, False, 1.0, "aligned")
    modern = BaseTrainConfig.defaults(preset="cpu", recipe="2026")
    assert modern.layer_lambdas and modern.qk_scale == 1.2


def test_stage_functions_take_typed_options_not_a_namespace():
    """Only a command's entry points (run, add_arguments, from_args) see argparse.Namespace in picochat/train."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "picochat" / "train"
    offenders = []
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in (
                    "run", "add_arguments", "from_args"):
                for arg in node.args.args:
                    if arg.annotation is not None and "Namespace" in ast.unparse(arg.annotation):
                        offenders.append(f"{path.name}:{node.name}")
                    if arg.arg == "args":
                        offenders.append(f"{path.name}:{node.name}({arg.arg})")
    assert offenders == []


@pytest.mark.parametrize(("argv", "options"), [
    (["chat-eval"], ChatEvalConfig), (["base-eval"], CoreEvalConfig),
    (["data", "prepare"], PrepareConfig), (["data", "download"], DownloadConfig)])
def test_the_other_commands_options_come_from_their_dataclass_too(argv, options):
    """Evaluation and data commands: one flag per field, left None on the command line so a preset can
    fill it, and the field's default when nothing gives one."""
    p = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[argv[0]][0]).add_arguments(p)
    args = p.parse_args(argv[1:])
    sub = p._subparsers._group_actions[0].choices[argv[1]] if len(argv) > 1 else p
    actions = {a.dest: a for a in sub._actions}
    for f in dataclasses.fields(options):
        action = actions[f.name]
        assert "--" + f.name.replace("_", "-") in action.option_strings and action.default is None
        assert action.help.startswith(f.metadata["help"].replace("%", "%%"))
    resolved = options.from_args(args)
    derived = {"temperature": 0.0}  # chat-eval: greedy for one sample
    assert resolved.to_dict() == {f.name: derived.get(f.name, f.default) for f in dataclasses.fields(options)}


def test_short_flags_and_checks_of_the_other_commands():
    p = argparse.ArgumentParser()
    importlib.import_module(COMMANDS["data"][0]).add_arguments(p)
    dl = DownloadConfig.from_args(p.parse_args(["download", "-n", "3", "-w", "2"]))
    assert (dl.num_shards, dl.workers, dl.source) == (3, 2, "fineweb-edu")
    assert ChatEvalConfig.defaults(num_samples=4).temperature == 1.0
    for options, given, message in [(ChatEvalConfig, {"max_problems": 0}, "--max-problems must be >= 1"),
                                    (ChatEvalConfig, {"batch_size": 0}, "--batch-size must be >= 1"),
                                    (CoreEvalConfig, {"max_per_task": 0}, "--max-per-task must be >= 1, or -1"),
                                    (DownloadConfig, {"source": "c4"}, "--source 'c4' is not one of")]:
        with pytest.raises(ConfigError, match=message):
            options.defaults(**given)


def test_every_commands_defaults_live_in_its_options():
    """No command keeps a dict of defaults of its own: resolve() is called by config.py alone."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "picochat"
    callers = sorted(str(path.relative_to(root)) for path in root.rglob("*.py")
                     if path.name != "config.py" and "resolve(args" in path.read_text())
    assert callers == []


@pytest.mark.parametrize("stage", [BaseTrainConfig, MidConfig, SFTConfig, RLConfig])
def test_a_negative_keep_last_is_refused_not_a_deletion_of_every_older_checkpoint(stage):
    """--keep-last 0 keeps every checkpoint; a negative value deleted all but the newest, silently."""
    with pytest.raises(ConfigError) as e:
        stage.defaults(keep_last=-1)
    assert str(e.value) == "--keep-last must be >= 0, got -1"
    assert stage.defaults(keep_last=0).keep_last == 0
