"""`picochat mid-train`: teach a base model the chat format, tools and multiple choice.

    picochat mid-train --preset cpu
    torchrun --standalone --nproc_per_node=8 -m picochat mid-train --preset d20

Conversations of the mixture are rendered and packed into a `<|bos|>`-separated
stream cut into (B, T) blocks. One pass: every rank counts the tokens of its share
of the mixture, the number of steps is what fits in the smallest share (all ranks
agree, via all-reduce MIN); the partial last step is dropped, unless --time-budget sets the
horizon from throughput instead. LR: flat for 80% of the steps, then linear to 0.
Checkpoints go to checkpoints/mid/<tag>/.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist

from picochat.config import add_preset_argument, option
from picochat.data.chat_batches import PackedConversations
from picochat.errors import ConfigError
from picochat.eval.bpb import evaluate_bpb
from picochat.plan import valid_batches
from picochat.runtime import log0, pick_training_dtype
from picochat.train.base_train import check_batch
from picochat.train.chat_stage import ChatStageConfig, StagePlan, load_parent, run_trainer, stage_world
from picochat.train.loop import all_reduced
from picochat.train.mixtures import MID, MID_VAL, build_mixture, describe, pick
from picochat.train.schedules import constant_then_linear_to_zero

BATCH = "batch and eval"


@dataclass
class MidConfig(ChatStageConfig):
    """Every setting of mid-training; `picochat mid-train --help` lists them as flags."""

    SECTION: ClassVar[str | None] = "mid"

    device_batch_size: int = option(32, "sequences per micro-batch per process", group=BATCH, minimum=1)
    total_batch_size: int = option(524288, "tokens per optimiser step", group=BATCH, minimum=1)
    mask_user: bool = option(False, "train on assistant tokens only (default: every token is a target, as the "
                             "reference)", group=BATCH, store_true=True)
    eval_every: int = option(150, "val bpb every N steps (<=0: at the end only)", group=BATCH)
    eval_tokens: int = option(10 * 524288, "val tokens per evaluation", group=BATCH)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_preset_argument(p)
    MidConfig.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    cfg = MidConfig.from_args(args)
    with stage_world(cfg) as world:
        dtype = pick_training_dtype(world.device, cfg.dtype)
        model, tokenizer, parent_meta, tag = load_parent(
            cfg, world, dtype, lambda c: valid_batches(cfg.total_batch_size, c.sequence_len, world.world_size),
            lambda c: check_batch(cfg, world.world_size, c.sequence_len))
        T, B = model.config.sequence_len, cfg.device_batch_size
        grad_accum = check_batch(cfg, world.world_size, T)
        per_micro = B * T * world.world_size
        entries = pick(MID, cfg.source, cfg.mix_scale)
        log0(f"mid mixture ({cfg.source}, {cfg.mix_scale}): {describe(entries)}")
        train_mix = build_mixture(entries, cfg.source, seed=cfg.seed)
        val_mix = build_mixture(MID_VAL[cfg.mix_scale], cfg.source, seed=cfg.seed)
        batches = PackedConversations(train_mix, tokenizer, B, T, world.rank, world.world_size, world.device,
                                      mask_user=cfg.mask_user)
        tokens = int(all_reduced([batches.tokens_per_epoch()], world, world.device, dist.ReduceOp.MIN)[0])
        num_iterations = (tokens - 1) // (B * T * grad_accum)
        if num_iterations < 1:
            raise ConfigError(f"the mid mixture has {tokens:,} tokens per process, less than one step "
                              f"({B * T * grad_accum:,}); use a larger --mix-scale or a smaller --total-batch-size")
        log0(f"one pass: {len(train_mix):,} conversations, {tokens:,} tokens per process -> "
             f"{num_iterations} steps of {cfg.total_batch_size:,} tokens (grad accum {grad_accum})")
        eval_steps = cfg.eval_tokens // per_micro
        if eval_steps < 1:
            raise ConfigError(f"--eval-tokens {cfg.eval_tokens} is less than one batch ({per_micro}); raise it")
        token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.long, device=world.device)

        def evaluate(m, step):
            val = PackedConversations(val_mix, tokenizer, B, T, world.rank, world.world_size, world.device)
            return {"val_bpb": evaluate_bpb(m, val, eval_steps, token_bytes, dtype)}

        run_trainer(cfg, world, model, tokenizer, parent_meta, dtype, StagePlan(
            "mid", tag, batches, num_iterations, grad_accum, cfg.total_batch_size, constant_then_linear_to_zero,
            # --mask-user: micro-batches supervise different numbers of tokens, so the step's loss is the
            # mean over all of them (a mean of micro-batch means would weight them unevenly).
            evaluate, "tokens" if cfg.mask_user else "mean",
            {"mixture": describe(entries), "conversations": len(train_mix), "mask_user": cfg.mask_user}))
        return 0
