"""What mid-training and SFT share: flags, loading the parent checkpoint, building the Trainer.

The stages differ only in data (packed stream vs padded rows), schedule and evals,
which `mid_train.py` and `sft.py` pass in; the loop is `picochat.train.loop.Trainer`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from picochat.checkpoint import find_checkpoint, load_checkpoint_dir
from picochat.config import option
from picochat.errors import ConfigError, DataError
from picochat.mfu import use_expandable_segments
from picochat.model.gpt import GPTConfig, compiled_for_training
from picochat.optim import build_optimizers, muon_momentum
from picochat.plan import Shape, check_fits
from picochat.runtime import Dist, init_distributed, log0, seed_everything, shutdown_distributed
from picochat.tasks.sources import SOURCE_CHOICES, resolve_source
from picochat.train.loop import LoopConfig, Trainer, from_main, verify_shared_home, wandb_logger
from picochat.train.options import LoopOptions, ParentOptions, StageOptions


@dataclass
class ChatStageConfig(ParentOptions, LoopOptions):
    """What mid-training and SFT share; MidConfig and SFTConfig add their batch and eval fields."""

    source: str = option("offline", "task data from registry packages (offline), the Hugging Face hub (hf), or the "
                         "hub when it answers and offline otherwise (auto)", group="data", choices=SOURCE_CHOICES)
    mix_scale: str = option("full", "size of the task mixture", group="data", choices=("tiny", "cpu", "full"))


@contextmanager
def stage_world(cfg: StageOptions) -> Iterator[Dist]:
    """Join the world with expandable CUDA segments, check that every rank sees the same home, seed every
    random generator with --seed, and shut the world down when the stage ends."""
    use_expandable_segments()  # before CUDA is initialised
    world = init_distributed(cfg.device)
    try:
        verify_shared_home(world)
        seed_everything(cfg.seed)
        yield world
    finally:
        shutdown_distributed()


def find_parent(cfg: ParentOptions, world):
    """The starting checkpoint's directory, chosen once on rank 0 (the newest, unless given) for every rank."""
    try:
        found = str(find_checkpoint(cfg.from_stage, cfg.from_tag, cfg.from_step)) if world.is_main else None
    except DataError as e:
        found = e
    found = from_main(found, world)
    if isinstance(found, Exception):
        raise DataError(str(found))
    return Path(found)


def load_parent(cfg: ChatStageConfig, world, dtype, candidates, batch_check):
    """(model, tokenizer, meta, tag) of the checkpoint this stage starts from.

    First --source auto is settled once, on rank 0 (one probe of the hub), the same on every rank.
    Before anything is allocated, `check_memory` (with `candidates` and `batch_check`) runs on the
    parent's config.
    """
    cfg.source = from_main(resolve_source(cfg.source, log=log0) if world.is_main else None, world)
    path = find_parent(cfg, world)
    if (path / "config.json").exists():
        config = GPTConfig.from_dict(json.loads((path / "config.json").read_text()))
        check_memory(cfg, world, dtype, cfg.compiles(world.device.type, dtype), config, candidates, batch_check)
    model, tokenizer, meta = load_checkpoint_dir(path, world.device)
    log0(f"starting from {path} ({model.num_params():,} params)")
    return model, tokenizer, meta, cfg.tag or meta.get("tag") or path.parent.name


def check_memory(cfg: LoopOptions, world, dtype, compiled: bool, config, candidates, batch_check=None) -> None:
    """The plan's estimate for this stage on `config` (the parent's in `load_parent`, base-train's own) must
    fit the device (unless --no-plan-check), else an error naming --device-batch-size.

    `candidates(config)` lists the device batches that divide the step; `batch_check(config)`
    raises first if the batch flags cannot work at this world size.
    """
    if batch_check is not None:
        batch_check(config)
    if cfg.no_plan_check:
        return
    # Tokens per step: base and mid pack --total-batch-size; SFT: --examples-per-step rows of up to T.
    total = getattr(cfg, "total_batch_size", None) or cfg.examples_per_step * config.sequence_len
    shape = Shape.from_config(config, cfg.device_batch_size, world_size=world.world_size, compiled=compiled,
                              bf16=dtype != torch.float32, total_batch_tokens=total)
    check_fits(shape, world.device, "--device-batch-size", candidates(config))


@dataclass
class StagePlan:
    """What a chat stage hands the shared trainer shell: its batches, horizon, schedule and eval."""

    stage: Literal["mid", "sft"]
    tag: str
    batches: Any  # a stateful iterator of (inputs, targets, supervised-token count) batches
    num_iterations: int
    grad_accum: int
    tokens_per_step: int
    lr_multiplier: Callable[[int, int], float]  # (step, horizon) -> multiple of the base LRs
    evaluate: Callable[[Any, int], dict] | None
    loss_weighting: Literal["mean", "tokens"]  # per micro-batch mean, or weighted by supervised tokens
    extra_meta: dict = field(default_factory=dict)  # recorded in every checkpoint's meta.json


def run_trainer(cfg: ChatStageConfig, world, model, tokenizer, parent_meta: dict, dtype, plan: StagePlan) -> dict:
    """Build optimisers and the Trainer, resume if asked, run, and return the final metrics."""
    if (parent_meta.get("stage"), parent_meta.get("tag")) == (plan.stage, plan.tag) and not cfg.resume:
        # A fresh run saves into its run directory and drops the checkpoints it does not keep there.
        raise ConfigError(f"--from-stage {cfg.from_stage} starts from {plan.stage}/{plan.tag}, the run this one "
                          "would save into (and replace): give another --tag, or --resume to continue that run")
    muon = cfg.muon_options(parent_meta)
    optimizers = build_optimizers(model, matrix_lr=cfg.matrix_lr, embedding_lr=cfg.embedding_lr,
                                  unembedding_lr=cfg.unembedding_lr, weight_decay=cfg.weight_decay, muon_options=muon)
    train_model = compiled_for_training(model, dynamic=False) if cfg.compiles(world.device.type, dtype) else model
    loop_cfg = LoopConfig(stage=plan.stage, tag=plan.tag, num_iterations=plan.num_iterations,
                          grad_accum_steps=plan.grad_accum, tokens_per_step=plan.tokens_per_step,
                          eval_every=cfg.eval_every, save_every=cfg.save_every,
                          save_every_minutes=cfg.save_every_minutes, keep_last=cfg.keep_last,
                          loss_weighting=plan.loss_weighting, time_budget_s=60 * cfg.time_budget,
                          grad_reduce_dtype=cfg.grad_reduce_dtype)
    run_meta = {"parent": {"stage": cfg.from_stage, "tag": parent_meta.get("tag"), "step": parent_meta.get("step")},
                "args": cfg.to_dict(), "muon": dataclasses.asdict(muon), **plan.extra_meta}
    trainer = Trainer(model, optimizers, plan.batches, loop_cfg, world, tokenizer, lr_multiplier=plan.lr_multiplier,
                      momentum=lambda s: muon_momentum(s, cfg.momentum_warmup_steps), evaluate=plan.evaluate,
                      compute_dtype=dtype, train_model=train_model, run_meta=run_meta,
                      on_log=wandb_logger(cfg.wandb, plan.stage, cfg.to_dict()) if world.is_main else None)
    return trainer.resume_and_run(cfg.resume)
