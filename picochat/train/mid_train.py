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

import torch

from picochat.config import resolve
from picochat.errors import ConfigError
from picochat.plan import explain_batch_divisibility, valid_batches
from picochat.train.chat_stage import CHAT_DEFAULTS, add_chat_stage_arguments

DEFAULTS = {**CHAT_DEFAULTS, "device_batch_size": 32, "total_batch_size": 524288, "eval_every": 150,
            "eval_tokens": 10 * 524288}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_chat_stage_arguments(p, parent_default="base")
    g = p.add_argument_group("batch and eval")
    g.add_argument("--device-batch-size", type=int, help="sequences per micro-batch per process")
    g.add_argument("--total-batch-size", type=int, help="tokens per optimiser step")
    g.add_argument("--mask-user", action="store_true",
                   help="train on assistant tokens only (default: every token is a target, as the reference)")
    g.add_argument("--eval-every", type=int, help="val bpb every N steps (<=0: at the end only)")
    g.add_argument("--eval-tokens", type=int, help="val tokens per evaluation")


def run(args: argparse.Namespace) -> int:
    batch_from_flag = args.device_batch_size is not None
    resolve(args, DEFAULTS, section="mid")
    import torch.distributed as dist

    from picochat.data.chat_batches import PackedConversations
    from picochat.eval.bpb import evaluate_bpb
    from picochat.runtime import log0, pick_dtype, seed_everything, shutdown_distributed
    from picochat.train.chat_stage import (
        StagePlan,
        agreed_source,
        check_memory,
        compiles,
        load_parent,
        run_trainer,
        start_world,
    )
    from picochat.train.mixtures import MID, MID_VAL, build_mixture, describe, pick
    from picochat.train.schedules import constant_then_linear_to_zero

    world = start_world(args)
    try:
        args.source = agreed_source(args.source, world)
        seed_everything(args.seed)
        dtype = pick_dtype(world.device, args.dtype)

        def batch_check(config) -> None:
            problem = explain_batch_divisibility(args.total_batch_size, args.device_batch_size,
                                                 config.sequence_len, world.world_size, "--total-batch-size")
            smaller = [b for b in valid_batches(args.total_batch_size, config.sequence_len, world.world_size)
                       if b < args.device_batch_size]
            if problem and smaller and not batch_from_flag:  # the preset's batch: lower it for this world size
                log0(f"the preset's device batch {args.device_batch_size} does not divide --total-batch-size "
                     f"{args.total_batch_size} over {world.world_size} processes; using --device-batch-size "
                     f"{smaller[-1]}")
                args.device_batch_size, problem = smaller[-1], None
            if problem:
                raise ConfigError(problem)

        check = check_memory(args, world, dtype, compiles(args, world), "--device-batch-size",
                             lambda c: valid_batches(args.total_batch_size, c.sequence_len, world.world_size),
                             batch_check)
        model, tokenizer, parent_meta, tag = load_parent(args, world, check)
        T, B = model.config.sequence_len, args.device_batch_size
        batch_check(model.config)
        per_micro = B * T * world.world_size
        grad_accum = args.total_batch_size // per_micro
        entries = pick(MID, args.source, args.mix_scale)
        log0(f"mid mixture ({args.source}, {args.mix_scale}): {describe(entries)}")
        train_mix = build_mixture(entries, args.source, seed=args.seed)
        val_mix = build_mixture(MID_VAL[args.mix_scale], args.source, seed=args.seed)
        batches = PackedConversations(train_mix, tokenizer, B, T, world.rank, world.world_size, world.device,
                                      mask_user=args.mask_user)
        tokens = torch.tensor([batches.tokens_per_epoch()], device=world.device)
        if world.enabled:
            dist.all_reduce(tokens, op=dist.ReduceOp.MIN)
        num_iterations = (int(tokens.item()) - 1) // (B * T * grad_accum)
        if num_iterations < 1:
            raise ConfigError(f"the mid mixture has {int(tokens.item()):,} tokens per process, less than one step "
                              f"({B * T * grad_accum:,}); use a larger --mix-scale or a smaller --total-batch-size")
        log0(f"one pass: {len(train_mix):,} conversations, {int(tokens.item()):,} tokens per process -> "
             f"{num_iterations} steps of {args.total_batch_size:,} tokens (grad accum {grad_accum})")
        eval_steps = args.eval_tokens // per_micro
        if eval_steps < 1:
            raise ConfigError(f"--eval-tokens {args.eval_tokens} is less than one batch ({per_micro}); raise it")
        token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.long, device=world.device)

        def evaluate(m, step):
            val = PackedConversations(val_mix, tokenizer, B, T, world.rank, world.world_size, world.device)
            return {"val_bpb": evaluate_bpb(m, val, eval_steps, token_bytes, dtype)}

        run_trainer(args, world, model, tokenizer, parent_meta, dtype, StagePlan(
            "mid", tag, batches, num_iterations, grad_accum, args.total_batch_size, constant_then_linear_to_zero,
            evaluate, "mean", {"mixture": describe(entries), "conversations": len(train_mix),
                               "mask_user": args.mask_user}))
        return 0
    finally:
        shutdown_distributed()
