"""Presets, recipes and typed options: one config system for every command.

A training stage describes its settings as a dataclass (`BaseTrainConfig`, `MidConfig`, ...)
whose fields are made with `option()`: one default and one line of help each. The command's
flags and their help are generated from it (`Options.add_arguments`), and `Options.from_args`
fills every field, in order of precedence, from the command line, then the chosen `--preset`
(and `--recipe`), then the field's default, and checks every enumeration.
So `--preset cpu --depth 6` is the cpu preset with a deeper model.

The other commands with settings of their own (chat-eval, base-eval, data) describe them the
same way; the flag blocks many commands share (--stage/--tag/--step, --device/--dtype) are added
by `add_checkpoint_arguments` and `add_device_arguments`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, ClassVar

from picochat.errors import ConfigError


def _gpu_preset(depth: int, device_batch_size: int) -> dict[str, Any]:
    """A GPU-scale preset with the seeds' values (8xH100 class) at one depth."""
    return {"vocab_size": 65536, "max_chars": 10_000_000_000, "doc_cap": 10_000,
            "depth": depth, "aspect_ratio": 64, "head_dim": 128, "max_seq_len": 2048,
            "device_batch_size": device_batch_size, "total_batch_size": 524288, "target_param_data_ratio": 20,
            "eval_every": 250, "eval_tokens": 20 * 524288, "sample_every": 2000, "warmup_steps": 0}


# Keys are flag destinations (argparse `dest`), shared across commands where they mean the same thing.
PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on a laptop: for tests and CI. Learns nothing useful.
    "cpu-tiny": {
        "vocab_size": 512, "max_chars": 2_000_000, "doc_cap": 2_000,
        "depth": 2, "aspect_ratio": 32, "head_dim": 32, "max_seq_len": 128,
        "device_batch_size": 2, "total_batch_size": 512, "num_iterations": 20,
        "eval_every": 10, "eval_tokens": 4096, "sample_every": -1, "warmup_steps": 2,
        "mid": {"mix_scale": "tiny", "device_batch_size": 2, "total_batch_size": 512, "eval_every": -1,
                "eval_tokens": 2048},
        "sft": {"mix_scale": "tiny", "device_batch_size": 2, "examples_per_step": 4, "eval_every": -1,
                "eval_items": 8},
        "speedrun": {"data": "builtin",
                     "core": ["--max-per-task", "4", "--tasks", "copa,arc_easy,lambada_openai"],
                     "chat": ["--max-problems", "4", "-a", "ARC-Easy|SpellingBee", "--max-new-tokens", "32"],
                     "loss": ["--split-tokens", "4096", "--max-new-tokens", "8"]},
    },
    # Pretraining gets 15 minutes of wall time on any machine (the horizon is fixed from the first
    # steps' throughput); the whole cpu speedrun took 23 min on a fast-bf16 CPU and 39 on an AVX2 one. The
    # 2026 architecture and Muon with unscaled LRs, less the residual/x0 lambdas and the 1.2 QK scale,
    # which cost bpb at this size on two seeds, on aligned rows (every document's head read from its
    # <|bos|> as best-fit rows do, its tail packed; lower than packed rows on both val columns, two
    # seeds) with the tails of one document in ten in the first epoch (tail_keep 0.1: ~80% of its rows are
    # document heads, and it reads more documents for its tokens; lower on both columns than every tail,
    # two seeds, most of all on document starts; later epochs read every tail), with the LR decaying
    # linearly over the whole run (warmdown ratio 1.0: lower than the recipe's last 65% on both columns,
    # two seeds). The comparisons and the one-component-out table are in docs/LOG.md. One eval at the
    # end, over 1.76M tokens: nearly all of the val shard (1.79M at vocab 8,192), which puts its standard
    # error just under 0.01 bpb.
    "cpu": {
        "recipe": "2026", "batch_lr_scale": "none", "loader": "aligned", "tail_keep": 0.1, "warmup_steps": 10,
        "warmdown_ratio": 1.0, "layer_lambdas": False, "qk_scale": 1.0,
        "vocab_size": 8192, "max_chars": 200_000_000, "doc_cap": 10_000,
        "depth": 4, "aspect_ratio": 64, "head_dim": 64, "max_seq_len": 256,
        "device_batch_size": 16, "total_batch_size": 4096, "time_budget": 15.0,
        "eval_every": -1, "eval_tokens": 430 * 4096, "sample_every": 250,
        "mid": {"mix_scale": "cpu", "device_batch_size": 16, "total_batch_size": 4096, "eval_every": -1,
                "eval_tokens": 32768, "time_budget": -1.0},
        "sft": {"mix_scale": "cpu", "device_batch_size": 4, "examples_per_step": 16, "eval_every": -1,
                "eval_items": 100, "time_budget": -1.0},
        # Evals capped to fit the laptop budget; base-loss scores the val tokens training's eval scored, in
        # the same rows of 16 (so the two standard errors agree too).
        "speedrun": {"data": "builtin", "core": ["--max-per-task", "50"],
                     "chat": ["--max-problems", "30", "--max-new-tokens", "64"],
                     "loss": ["--split-tokens", str(430 * 4096), "--train-tokens", str(96 * 4096),
                              "--device-batch-size", "16"]},
    },
    # GPU scale, the seeds' values (8xH100 class).
    "d20": _gpu_preset(20, device_batch_size=32),
    "d26": _gpu_preset(26, device_batch_size=16),
    "d32": _gpu_preset(32, device_batch_size=8),
    # GPT-2 grade (CORE > 0.2565) on one 8-GPU node with the 2026 recipe: the reference's fastest
    # published setting (depth 24, 8 tokens per scaling parameter, vocab 2^15, automatic batch: 2^20),
    # a tokenizer trained on ~2B characters, ClimbMix text. FLOPs and time on paper: docs/LOG.md.
    "gpt2": {
        "recipe": "2026", "vocab_size": 32768, "max_chars": 2_000_000_000, "doc_cap": 10_000,
        "depth": 24, "aspect_ratio": 64, "head_dim": 128, "max_seq_len": 2048,
        "device_batch_size": 16, "total_batch_size": -1, "target_param_data_ratio": 8,
        "eval_every": 250, "eval_tokens": 40 * 524288, "sample_every": 2000,
    },
}

# RL has its own knobs (rollouts, samples); GPU presets use the RL command's defaults.
PRESETS["cpu-tiny"]["rl"] = {"num_steps": 4, "examples_per_step": 2, "num_samples": 2, "max_new_tokens": 12,
                             "device_batch_size": 2, "train_size": 64, "eval_every": -1, "eval_problems": 2,
                             "eval_samples": 2, "save_every": -1}
PRESETS["cpu"]["rl"] = {"num_steps": 16, "examples_per_step": 4, "num_samples": 4, "max_new_tokens": 96,
                        "device_batch_size": 8, "train_size": 64, "eval_every": 8, "eval_problems": 8,
                        "eval_samples": 2, "save_every": 8}

# GPU presets share the seeds' chat-stage settings: mid packs 2^19-token steps; SFT takes
# 4 conversations per device and 32 per step. Every training stage saves after each
# 30 minutes of wall time (agreed across ranks) and keeps the newest 2, so a crash of a
# multi-hour run loses at most half an hour.
for _name in ("d20", "d26", "d32", "gpt2"):
    PRESETS[_name].update({"save_every_minutes": 30.0, "keep_last": 2})
    # Chat stages take the hub's full mixtures (SmolTalk, MMLU auxiliary train, GSM8K train) when
    # it answers and the offline ones otherwise; CORE runs on the DCLM bundle, as published scores do.
    PRESETS[_name]["mid"] = {"mix_scale": "full", "total_batch_size": 524288, "eval_every": 150,
                             "eval_tokens": 10 * 524288, "source": "auto"}
    PRESETS[_name]["sft"] = {"mix_scale": "full", "device_batch_size": 4, "examples_per_step": 32,
                             "eval_every": 200, "eval_items": 1000, "source": "auto"}
    PRESETS[_name]["speedrun"] = {"data": "fineweb-edu", "core": ["--bundle", "dclm", "--max-per-task", "500"],
                                  "chat": [], "loss": ["--split-tokens", str(20 * 524288)]}
# The time-to-GPT-2 comparison: ClimbMix text and every CORE item.
PRESETS["gpt2"]["speedrun"].update({"data": "climbmix", "core": ["--bundle", "dclm", "--max-per-task", "-1"]})


# How to train, apart from how big: a preset may name one ("recipe"), and --recipe on the command line
# picks one over the preset's (its keys then win over the preset's too; sizes stay the preset's).
RECIPES: dict[str, dict[str, Any]] = {
    # October 2025: the commands' own defaults (classic architecture, Muon with Newton-Schulz, packed rows).
    "2025": {},
    # The reference's newest (mid-2026) recipe, tuned at 2^19-token steps on a depth-12 model.
    "2026": {
        # architecture
        "value_embeds": True, "layer_lambdas": True, "smear": True, "backout": True, "window_pattern": "SSSL",
        "qk_scale": 1.2, "rope_theta": 100000.0, "init": "2026",
        # Muon: Polar Express, MuonEq, Muon+, NorMuon, cautious weight decay on a half-cosine schedule
        "muon_orthogonalizer": "polar_express", "muon_eq": True, "muon_plus": True, "normuon": True,
        "normuon_beta2": 0.9, "cautious_wd": True, "muon_weight_decay": 0.28, "weight_decay_schedule": "cosine",
        "momentum_warmup_steps": 400, "momentum_end": 0.97, "momentum_final": 0.90,
        # AdamW groups and the LR schedule
        "embedding_lr": 0.3, "embedding_betas": "0.8,0.995", "embedding_weight_decay": 0.001,
        "unembedding_lr": 0.008, "unembedding_betas": "0.8,0.96", "unembedding_weight_decay": 0.01,
        "matrix_lr": 0.02, "scalar_lr": 0.5, "warmup_steps": 40, "warmdown_ratio": 0.65, "final_lr_frac": 0.05,
        # LRs x sqrt(B / 2^19) and Muon's decay x sqrt(B / 2^19) x (D_ref / D); BOS-aligned best-fit rows
        "batch_lr_scale": "sqrt", "loader": "bestfit",
        # precision: the block matmuls in float8 where the GPU has FP8 tensor cores (H100 and up)
        "fp8": "auto",
    },
}


HORIZON_FLAGS = ("num_iterations", "target_flops", "target_param_data_ratio")


STAGES = ("base", "mid", "sft", "rl")


def option(default: Any, help: str, *, group: str | None = None, choices: Any = None, metavar: str | None = None,
           store_true: bool = False, cli: bool = True, parse: Any = None, short: str | None = None,
           minimum: float | None = None) -> Any:
    """A field of an Options dataclass: its default, one line of help (the default is appended unless the
    line speaks of it), the help group it is listed under (None: the command's own), the values it may
    take, whether it is a flag at all (cli=False: set by the program), how the command line's text
    is read (default: the field's type), a one-letter flag beside the long one (e.g. "-n") and the
    smallest value allowed (checked wherever the value came from: flag, preset or code)."""
    return dataclasses.field(default=default, metadata={
        "help": help, "group": group, "choices": tuple(choices) if choices else None, "metavar": metavar,
        "store_true": store_true, "cli": cli, "parse": parse, "short": short, "minimum": minimum})


# The order of help groups in `--help` (others before "runtime", which is listed last).
GROUP_ORDER = (None, "start from", "data", "model", "batch and horizon", "batch and eval",
               "rollouts", "model and batch (default: the preset's, else d20's)", "target", "optimisation",
               "eval and checkpoints", "runtime")


def _help_line(f: dataclasses.Field) -> str:
    text = f.metadata["help"]
    if f.default is not None and "default" not in text and not f.metadata["store_true"]:
        shown = ("on" if f.default else "off") if isinstance(f.default, bool) else f"{f.default:,}" \
            if isinstance(f.default, int) else f"{f.default:g}" if isinstance(f.default, float) else f.default
        text += f" (default {shown})"
    return text.replace("%", "%%")  # argparse formats help with %


class Options:
    """Base of a command's typed options: a dataclass whose fields are option()s.

    SECTION names the preset's sub-dict for this stage (it wins over the preset's top level;
    with SECTION_ONLY the top level is ignored). PRETRAINING, for a command that describes a
    pretraining run (base-train, plan): a horizon given on the command line (--num-iterations,
    --target-flops, --target-param-data-ratio) replaces a preset's --time-budget, unless
    --time-budget is given too, and --recipe applies.
    """

    SECTION: ClassVar[str | None] = None
    SECTION_ONLY: ClassVar[bool] = False
    PRETRAINING: ClassVar[bool] = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices and value is not None and value not in choices:
                raise ConfigError(f"--{f.name.replace('_', '-')} {value!r} is not one of {', '.join(map(str, choices))}")
            minimum = f.metadata.get("minimum")
            if minimum is not None and value is not None and value < minimum:
                raise ConfigError(f"--{f.name.replace('_', '-')} must be >= {minimum:g}, got {value}")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser | argparse._ActionsContainer,
                      container: argparse._ActionsContainer | None = None, parser_defaults: bool = False) -> None:
        """One flag per field, under its group (or all in `container`). The parser's defaults are None,
        so that from_args can tell a flag given from one left to the preset, unless `parser_defaults`
        (for commands that read the Namespace as it is)."""
        hints = typing.get_type_hints(cls)
        groups: dict[str | None, Any] = {None: parser}
        flags = [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]
        for f in sorted(flags, key=lambda f: GROUP_ORDER.index(f.metadata["group"])
                        if f.metadata["group"] in GROUP_ORDER else len(GROUP_ORDER) - 1):
            meta = f.metadata
            if container is None and meta["group"] not in groups:
                groups[meta["group"]] = parser.add_argument_group(meta["group"])
            target = groups[meta["group"]] if container is None else container
            kind = hints[f.name]
            if typing.get_origin(kind) in (typing.Union, types.UnionType):  # int for `int | None`, and so on
                kind = next(a for a in typing.get_args(kind) if a is not type(None))
            kw: dict[str, Any] = {"dest": f.name, "help": _help_line(f), "default": f.default if parser_defaults else None}
            if meta["store_true"]:
                kw["action"] = "store_true"
            elif kind is bool:
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw.update(type=meta["parse"] or kind, choices=meta["choices"], metavar=meta["metavar"])
            names = [meta["short"]] if meta.get("short") else []
            target.add_argument(*names, "--" + f.name.replace("_", "-"), **kw)

    @classmethod
    def from_args(cls, args: argparse.Namespace):
        """The options the command line, the preset (and recipe) and the defaults give, in that order."""
        horizon_given = cls.PRETRAINING and any(getattr(args, k, None) is not None for k in HORIZON_FLAGS)
        budget_given = getattr(args, "time_budget", None) is not None
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        resolve(args, defaults, section=cls.SECTION, section_only=cls.SECTION_ONLY)
        if horizon_given and not budget_given:
            args.time_budget = -1.0
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def defaults(cls, **given: Any):
        """The options a command line of `given` values (flag dests) resolves to, e.g. defaults(preset="cpu")."""
        return cls.from_args(argparse.Namespace(**given))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class DeviceOptions(Options):
    """--device and --dtype: where and in which compute dtype a command runs its model."""

    device: str = option("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps", group="runtime")
    dtype: str = option("auto", "compute dtype: auto (bf16 on GPUs and on CPUs with fast bf16, else fp32), bf16, fp32, "
                        "fp16", group="runtime")


def add_device_arguments(group: argparse._ActionsContainer) -> None:
    """--device and --dtype for a command that reads its Namespace as parsed."""
    DeviceOptions.add_arguments(group, container=group, parser_defaults=True)


def add_checkpoint_arguments(group: argparse._ActionsContainer, stage: str | None = None,
                             choose_stage: bool = True) -> None:
    """--stage, --tag, --step: which checkpoint a command loads (by default the newest of its stage).

    `stage` is the default stage; None means the most trained one that exists (rl, sft, mid, base).
    Commands that only read base checkpoints pass choose_stage=False.
    """
    if choose_stage:
        group.add_argument("--stage", choices=STAGES, default=stage,
                           help=f"checkpoint stage (default {stage})" if stage else
                           "checkpoint stage (default: the first of rl, sft, mid, base that exists)")
    group.add_argument("--tag", default=None, help="checkpoint tag (default: the newest)")
    group.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")


@dataclasses.dataclass
class ArchitectureOptions(Options):
    """The model's options beyond its size; each field is the GPTConfig field it sets (None: the classic
    model's value)."""

    value_embeds: bool | None = option(None, "a gated value embedding on every other layer", group="model")
    layer_lambdas: bool | None = option(
        None, "learned scalars before each block: x = resid_lambda * x + x0_lambda * embedding", group="model")
    smear: bool | None = option(None, "mix each token's predecessor's embedding into its own", group="model")
    backout: bool | None = option(
        None, "subtract a learned share of the middle layer's residual before the final norm", group="model")
    window_pattern: str | None = option(
        None, "attention windows tiled over the layers: L the whole context, S a quarter of it (e.g. SSSL); "
        "the last layer always sees the whole context (default L)", group="model", metavar="SL...")
    qk_scale: float | None = option(None, "factor on the normed queries and keys (default 1)", group="model")
    rope_theta: float | None = option(None, "rotary base (default 10000)", group="model")
    init: str | None = option(None, "weight init scheme (default classic)", group="model",
                              choices=("classic", "2026"))


ARCHITECTURE_FIELDS = tuple(f.name for f in dataclasses.fields(ArchitectureOptions))


@dataclasses.dataclass
class ModelOptions(ArchitectureOptions):
    """The model's size and options, from which base-train and plan build its GPTConfig."""

    depth: int = option(20, "number of transformer blocks (width and heads follow from it)", group="model")
    aspect_ratio: int = option(64, "width = depth * aspect ratio, rounded up to --head-dim", group="model")
    head_dim: int = option(128, "attention head dimension", group="model")
    n_kv_head: int | None = option(None, "key/value heads for grouped-query attention (default: all)", group="model")
    max_seq_len: int = option(2048, "context length T", group="model", minimum=1)

    def model_config(self, vocab_size: int, depth: int | None = None):
        """The GPTConfig these options describe (at `depth` instead of --depth if given, every head for k/v)."""
        from picochat.model.gpt import GPTConfig  # the model pulls in torch; options stay light

        return GPTConfig.from_depth(depth or self.depth, vocab_size, aspect_ratio=self.aspect_ratio,
                                    head_dim=self.head_dim, max_seq_len=self.max_seq_len,
                                    n_kv_head=None if depth else self.n_kv_head, **architecture_options(self))


def architecture_options(args: Any) -> dict[str, Any]:
    """The architecture fields set on `args` (options or a Namespace), as GPTConfig keyword arguments."""
    return {k: getattr(args, k) for k in ARCHITECTURE_FIELDS if getattr(args, k, None) is not None}


def add_preset_argument(parser: argparse.ArgumentParser, default: str | None = None, recipe: bool = False) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default=default,
                        help="named set of sizes (cpu-tiny: seconds, cpu: ~15 min on a laptop, d20/d26/d32: "
                        "GPU nodes, gpt2: GPT-2 grade on 8 GPUs); explicit flags override it")
    if recipe:
        parser.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                            help="how to train (2025: classic; 2026: the newest architecture, optimiser, schedule "
                            "and loader); default: the preset's, else 2025; explicit flags override it")


def resolve(args: argparse.Namespace, defaults: dict[str, Any], section: str | None = None,
            section_only: bool = False) -> argparse.Namespace:
    """Fill every flag in `defaults` that was not given: from the preset and the recipe, else the default.

    A recipe named by --recipe wins over the preset; one the preset names itself yields to the
    preset's own keys. Recipes reach base training only (a stage section gets none).

    With `section` (e.g. "sft"), the preset's `section` sub-dict wins over its top-level keys,
    so one preset can give base training and SFT different batch sizes. With `section_only`,
    the top-level keys are ignored (for a stage whose knobs mean something else, like RL).
    """
    preset_name = getattr(args, "preset", None)
    if preset_name is not None and preset_name not in PRESETS:
        raise ConfigError(f"--preset {preset_name!r} is unknown; choose one of {sorted(PRESETS)}")
    preset = dict(PRESETS.get(preset_name, {}))
    recipe_name = getattr(args, "recipe", None)
    if recipe_name is not None and recipe_name not in RECIPES:
        raise ConfigError(f"--recipe {recipe_name!r} is unknown; choose one of {sorted(RECIPES)}")
    recipe = RECIPES[recipe_name or preset.get("recipe", "2025")] if not section else {}
    if section:
        own = preset.get(section, {})
        preset = dict(own) if section_only else {**preset, **own}
    layers = [recipe, preset] if recipe_name is not None else [preset, recipe]  # first wins
    for key, default in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, next((layer[key] for layer in layers if key in layer), default))
    return args
