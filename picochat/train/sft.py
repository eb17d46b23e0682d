"""`picochat sft`: supervised fine-tuning on whole conversations.

    picochat sft --preset cpu                # from the newest mid checkpoint
    picochat sft --from-stage base           # skip mid-training

One conversation per row, right-padded (`picochat.data.sft_collate`); only the
assistant's tokens are targets. A step accumulates micro-batches of
--device-batch-size conversations up to --examples-per-step conversations; the loss
is the mean over every supervised token of the step (across micro-batches and ranks),
so a micro-batch with no supervised token contributes nothing. LR: --init-lr-frac
(0.02) of the base LRs, linearly to 0 at the end of the epochs (or of --time-budget).
Under torch.compile the rows are padded to one of four widths (max_seq_len / 8 .. max_seq_len),
so one run compiles at most four graphs. Evaluates val loss and MMLU / ARC accuracy.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist

from picochat.config import add_preset_argument, option
from picochat.data.chat_batches import PaddedConversations, width_buckets
from picochat.errors import ConfigError, DataError
from picochat.eval.categorical import evaluate_categorical
from picochat.runtime import log0, pick_training_dtype
from picochat.tasks import load_task
from picochat.train.base_train import lower_preset_batch
from picochat.train.chat_stage import ChatStageConfig, StagePlan, load_parent, run_trainer, stage_world
from picochat.train.mixtures import SFT, SFT_EVAL, build_mixture, describe, pick
from picochat.train.schedules import linear_to_zero

BATCH = "batch and eval"


@dataclass
class SFTConfig(ChatStageConfig):
    """Every setting of SFT; `picochat sft --help` lists them as flags."""

    SECTION: ClassVar[str | None] = "sft"

    from_stage: str = option("mid", "stage of the starting checkpoint", group="start from",
                             choices=("base", "mid", "sft"))
    device_batch_size: int = option(4, "conversations per micro-batch per process", group=BATCH, minimum=1)
    examples_per_step: int = option(32, "conversations per optimiser step (all processes)", group=BATCH, minimum=1)
    num_epochs: int = option(1, "passes over the mixture", group=BATCH, minimum=1)
    init_lr_frac: float = option(0.02, "LR multiplier at step 0 (linear to 0 at the end)", group=BATCH)
    eval_every: int = option(200, "val loss and MMLU/ARC accuracy every N steps (<=0: end only)", group=BATCH)
    eval_items: int = option(1000, "items per categorical eval task and val conversations", group=BATCH)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_preset_argument(p)
    SFTConfig.add_arguments(p)


def batch_choices(examples_per_step: int, world_size: int) -> list[int]:
    """Device batches that split --examples-per-step evenly over the processes."""
    per_rank = examples_per_step // world_size if examples_per_step % world_size == 0 else 0
    return [b for b in range(1, per_rank + 1) if per_rank % b == 0]


def check_examples_per_step(cfg: SFTConfig, world_size: int) -> None:
    """A ConfigError naming the flag to change, unless the preset's device batch can be lowered to fit."""
    per_micro = cfg.device_batch_size * world_size
    if cfg.examples_per_step % per_micro == 0:
        return
    choices = batch_choices(cfg.examples_per_step, world_size)
    if lower_preset_batch(cfg, f"--examples-per-step {cfg.examples_per_step}", choices, world_size):
        return
    smaller = [b for b in choices if b < cfg.device_batch_size]
    fix = (f"with {world_size} process(es) use --device-batch-size {smaller[-1]}, or " if smaller else "use ")
    raise ConfigError(f"--examples-per-step {cfg.examples_per_step} must be a multiple of device_batch_size*world "
                      f"= {cfg.device_batch_size}*{world_size} = {per_micro}; {fix}an --examples-per-step that is "
                      f"a multiple of {per_micro}")


def run(args: argparse.Namespace) -> int:
    cfg = SFTConfig.from_args(args)
    with stage_world(cfg) as world:
        dtype = pick_training_dtype(world.device, cfg.dtype)
        model, tokenizer, parent_meta, tag = load_parent(
            cfg, world, dtype, lambda c: batch_choices(cfg.examples_per_step, world.world_size),
            lambda c: check_examples_per_step(cfg, world.world_size))
        T, B = model.config.sequence_len, cfg.device_batch_size
        check_examples_per_step(cfg, world.world_size)
        grad_accum = cfg.examples_per_step // (B * world.world_size)
        entries = pick(SFT, cfg.source, cfg.mix_scale)
        log0(f"sft mixture ({cfg.source}, {cfg.mix_scale}): {describe(entries)}")
        train_mix = build_mixture(entries, cfg.source, seed=cfg.seed)
        # Each rank walks its own share of the mixture (rank r: conversations r, r+w, ...); the steps are
        # what the smallest share holds, so no rank starts a pass beyond --num-epochs before another ends one.
        num_iterations = len(train_mix) // world.world_size * cfg.num_epochs // (B * grad_accum)
        if num_iterations < 1:
            raise ConfigError(f"the SFT mixture has {len(train_mix)} conversations, fewer than one step "
                              f"(--examples-per-step {cfg.examples_per_step})")
        log0(f"{len(train_mix):,} conversations x {cfg.num_epochs} epoch(s) -> {num_iterations} steps of "
             f"{cfg.examples_per_step} conversations (grad accum {grad_accum})")
        # A few shapes for the compiler, exact widths eagerly.
        buckets = width_buckets(T) if cfg.compiles(world.device.type, dtype) else None
        batches = PaddedConversations(train_mix, tokenizer, B, T, world.rank, world.world_size, world.device,
                                      bucket_widths=buckets)
        evaluate = sft_evaluator(cfg, world, tokenizer, B, T, dtype)
        run_trainer(cfg, world, model, tokenizer, parent_meta, dtype, StagePlan(
            # tokens_per_step 0: padded rows make a step's token count vary (the step records hold each one).
            "sft", tag, batches, num_iterations, grad_accum, 0,
            lambda s, n: linear_to_zero(s, n, cfg.init_lr_frac), evaluate, "tokens",
            {"mixture": describe(entries), "conversations": len(train_mix)}))
        return 0


def sft_evaluator(cfg: SFTConfig, world, tokenizer, B: int, T: int, dtype):
    """The SFT eval: loss per supervised token on the mixture's val conversations, and the categorical
    accuracy of each eval task (both over every rank)."""
    plan = SFT_EVAL[cfg.mix_scale]
    val_name, val_split, val_kw = plan["val"]
    val_task = load_task(val_name, val_split, source=cfg.source, **val_kw)[: max(world.world_size, cfg.eval_items)]
    eval_tasks = {name: load_task(name, split, source=cfg.source) for name, split in plan["categorical"]}

    @torch.no_grad()
    def evaluate(m, step):
        m.eval()
        val = PaddedConversations(val_task, tokenizer, B, T, world.rank, world.world_size, world.device)
        total = torch.zeros(2, dtype=torch.float64, device=world.device)  # loss sum, supervised tokens
        for _ in range(max(1, val.walk.per_epoch // B)):
            x, y, _ = next(val)
            with torch.autocast(world.device.type, dtype=dtype, enabled=dtype != torch.float32):
                total[0] += m(x, y, loss_reduction="sum").double()
            total[1] += (y >= 0).sum()
        if world.enabled:
            dist.all_reduce(total)
        if total[1] == 0:
            raise DataError("SFT validation saw no supervised tokens; raise --eval-items")
        results = {"val_loss": (total[0] / total[1]).item()}
        for name, task in eval_tasks.items():
            r = evaluate_categorical(m, tokenizer, task, batch_size=B * 2, max_items=cfg.eval_items,
                                     rank=world.rank, world_size=world.world_size, compute_dtype=dtype)
            results[f"{name}_acc"] = r["accuracy"]
        m.train()
        return results

    return evaluate
