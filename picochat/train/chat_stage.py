"""What mid-training and SFT share: flags, loading the parent checkpoint, building the Trainer.

The stages differ only in data (packed stream vs padded rows), schedule and evals,
which `mid_train.py` and `sft.py` pass in; the loop is `picochat.train.loop.Trainer`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from picochat.config import add_device_arguments, add_preset_argument
from picochat.errors import DataError
from picochat.plan import add_plan_check_argument
from picochat.tasks.sources import SOURCE_CHOICES, resolve_source

CHAT_DEFAULTS = {
    "embedding_lr": 0.2, "unembedding_lr": 0.004, "matrix_lr": 0.02, "weight_decay": 0.0,
    "momentum_warmup_steps": 300, "save_every": -1, "save_every_minutes": -1.0, "keep_last": 2,
    "mix_scale": "full", "time_budget": -1.0, "source": "offline",
}


def add_chat_stage_arguments(p: argparse.ArgumentParser, parent_default: str) -> None:
    add_preset_argument(p)
    g = p.add_argument_group("start from")
    g.add_argument("--from-stage", default=parent_default, choices=["base", "mid", "sft"],
                   help=f"stage of the starting checkpoint (default {parent_default})")
    g.add_argument("--from-tag", default=None, help="tag of the starting checkpoint (default: newest)")
    g.add_argument("--from-step", type=int, default=None, help="step of the starting checkpoint (default: newest)")
    g = p.add_argument_group("data")
    g.add_argument("--source", choices=SOURCE_CHOICES,
                   help="task data from registry packages (offline), the Hugging Face hub (hf), or the hub when "
                   "it answers and offline otherwise (auto); default offline")
    g.add_argument("--mix-scale", choices=["tiny", "cpu", "full"], help="size of the task mixture")
    g.add_argument("--seed", type=int, default=42, help="mixture shuffle and everything random")
    g = p.add_argument_group("optimisation")
    g.add_argument("--embedding-lr", type=float, help="AdamW LR of the token embedding")
    g.add_argument("--unembedding-lr", type=float, help="AdamW LR of lm_head")
    g.add_argument("--matrix-lr", type=float, help="Muon LR of the block matrices")
    g.add_argument("--weight-decay", type=float, help="weight decay of the AdamW groups")
    g.add_argument("--momentum-warmup-steps", type=int, help="Muon momentum 0.85 -> 0.95 over this many steps")
    g.add_argument("--time-budget", type=float, metavar="MINUTES",
                   help="train for this many minutes instead of one pass: the horizon is set from the first "
                   "steps' throughput, then fixed (and kept on --resume)")
    g = p.add_argument_group("checkpoints and runtime")
    g.add_argument("--save-every", type=int, help="checkpoint every N steps (<=0: at the end only)")
    g.add_argument("--save-every-minutes", type=float,
                   help="also checkpoint when this many minutes of wall time passed since the last save (<=0: off)")
    g.add_argument("--keep-last", type=int, help="keep this many newest checkpoints")
    g.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint of this tag")
    g.add_argument("--tag", default=None, help="run name (default: the starting checkpoint's tag)")
    add_device_arguments(g)
    g.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="torch.compile (auto: CUDA)")
    g.add_argument("--grad-reduce-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="dtype of the cross-rank gradient reduction (bf16 halves the traffic, e.g. across nodes; the sum is rounded to bf16)")
    g.add_argument("--wandb", default=None, metavar="RUN", help="log to Weights & Biases under this run name")
    add_plan_check_argument(g)


def start_world(args):
    """Join the world with expandable CUDA segments, and check that every rank sees the same home."""
    from picochat.mfu import use_expandable_segments
    from picochat.runtime import init_distributed
    from picochat.train.loop import verify_shared_home

    use_expandable_segments()  # before CUDA is initialised
    world = init_distributed(args.device)
    verify_shared_home(world)
    return world


def find_parent(args, world):
    """The starting checkpoint's directory, chosen once on rank 0 (the newest, unless given) for every rank."""
    from pathlib import Path

    import torch.distributed as dist

    from picochat.checkpoint import find_checkpoint

    found = [None]
    if world.is_main:
        try:
            found = [str(find_checkpoint(args.from_stage, args.from_tag, args.from_step))]
        except DataError as e:
            found = [e]
    if world.enabled:
        dist.broadcast_object_list(found)
    if isinstance(found[0], Exception):
        raise DataError(str(found[0]))
    return Path(found[0])


def load_parent(args, world, check_memory=None):
    """(model, tokenizer, meta, tag) of the checkpoint this stage starts from.

    `check_memory(config)` runs on the parent's config before anything is allocated.
    """
    import json as _json

    from picochat.checkpoint import load_checkpoint_dir
    from picochat.model.gpt import GPTConfig
    from picochat.runtime import log0

    path = find_parent(args, world)
    if check_memory is not None and (path / "config.json").exists():
        check_memory(GPTConfig.from_dict(_json.loads((path / "config.json").read_text())))
    model, tokenizer, meta = load_checkpoint_dir(path, world.device)
    log0(f"starting from {path} ({model.num_params():,} params)")
    return model, tokenizer, meta, args.tag or meta.get("tag") or path.parent.name


def check_memory(args, world, dtype, compiled: bool, batch_flag: str, candidates, batch_check=None):
    """A `load_parent` hook: the plan's estimate for this stage must fit the device (unless --no-plan-check).

    `candidates(config)` lists the device batches that divide the step; `batch_check(config)`
    raises first if the batch flags cannot work at this world size.
    """
    import torch

    from picochat.plan import Shape, check_fits

    def check(config) -> None:
        if batch_check is not None:
            batch_check(config)
        if args.no_plan_check:
            return
        # Tokens per step: mid packs --total-batch-size; SFT takes --examples-per-step rows of up to T.
        total = getattr(args, "total_batch_size", None) or args.examples_per_step * config.sequence_len
        shape = Shape.from_config(config, args.device_batch_size, world_size=world.world_size, compiled=compiled,
                                  bf16=dtype != torch.float32, total_batch_tokens=total)
        check_fits(shape, world.device, batch_flag, candidates(config))

    return check


def compiles(args, world) -> bool:
    return args.compile == "on" or (args.compile == "auto" and world.device.type == "cuda")


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


def run_trainer(args, world, model, tokenizer, parent_meta: dict, dtype, plan: StagePlan) -> dict:
    """Build optimisers and the Trainer, resume if asked, run, and return the final metrics."""
    import torch

    from picochat.optim import build_optimizers, muon_momentum
    from picochat.runtime import log0
    from picochat.train.loop import LoopConfig, Trainer, wandb_logger

    optimizers = build_optimizers(model, matrix_lr=args.matrix_lr, embedding_lr=args.embedding_lr,
                                  unembedding_lr=args.unembedding_lr, weight_decay=args.weight_decay)
    train_model = torch.compile(model, dynamic=False) if compiles(args, world) else model
    cfg = LoopConfig(stage=plan.stage, tag=plan.tag, num_iterations=plan.num_iterations,
                     grad_accum_steps=plan.grad_accum, tokens_per_step=plan.tokens_per_step,
                     eval_every=args.eval_every, save_every=args.save_every,
                     save_every_minutes=args.save_every_minutes, keep_last=args.keep_last,
                     loss_weighting=plan.loss_weighting, time_budget_s=60 * args.time_budget,
                     grad_reduce_dtype=args.grad_reduce_dtype)
    run_meta = {"parent": {"stage": args.from_stage, "tag": parent_meta.get("tag"), "step": parent_meta.get("step")},
                "args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, **plan.extra_meta}
    trainer = Trainer(model, optimizers, plan.batches, cfg, world, tokenizer, lr_multiplier=plan.lr_multiplier,
                      momentum=lambda s: muon_momentum(s, args.momentum_warmup_steps), evaluate=plan.evaluate,
                      compute_dtype=dtype, train_model=train_model, run_meta=run_meta,
                      on_log=wandb_logger(args.wandb, plan.stage, vars(args)) if world.is_main else None)
    if args.resume:
        trainer.resume_newest()
    result = trainer.run()
    log0(f"done: {json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)})}")
    return result


def agreed_source(source: str, world) -> str:
    """--source with 'auto' settled once, on rank 0 (one probe of the hub), and the same on every rank."""
    import torch.distributed as dist

    from picochat.runtime import log0

    settled = [resolve_source(source, log=log0) if world.is_main else None]
    if world.enabled:
        dist.broadcast_object_list(settled)
    return settled[0]
