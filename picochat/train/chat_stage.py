"""What mid-training and SFT share: flags, loading the parent checkpoint, building the Trainer.

The stages differ only in data (packed stream vs padded rows), schedule and evals,
which `mid_train.py` and `sft.py` pass in; the loop is `picochat.train.loop.Trainer`.
"""

from __future__ import annotations

import argparse
import json

from picochat.config import add_preset_argument

CHAT_DEFAULTS = {
    "embedding_lr": 0.2, "unembedding_lr": 0.004, "matrix_lr": 0.02, "weight_decay": 0.0,
    "momentum_warmup_steps": 300, "save_every": -1, "keep_last": 2, "mix_scale": "full",
}


def add_chat_stage_arguments(p: argparse.ArgumentParser, parent_default: str) -> None:
    add_preset_argument(p)
    g = p.add_argument_group("start from")
    g.add_argument("--from-stage", default=parent_default, choices=["base", "mid", "sft"],
                   help=f"stage of the starting checkpoint (default {parent_default})")
    g.add_argument("--from-tag", default=None, help="tag of the starting checkpoint (default: newest)")
    g.add_argument("--from-step", type=int, default=None, help="step of the starting checkpoint (default: newest)")
    g = p.add_argument_group("data")
    g.add_argument("--source", choices=["offline", "hf"], default="offline",
                   help="task data from registry packages (offline) or the Hugging Face hub (hf)")
    g.add_argument("--mix-scale", choices=["tiny", "cpu", "full"], help="size of the task mixture")
    g.add_argument("--seed", type=int, default=42, help="mixture shuffle and everything random")
    g = p.add_argument_group("optimisation")
    g.add_argument("--embedding-lr", type=float, help="AdamW LR of the token embedding")
    g.add_argument("--unembedding-lr", type=float, help="AdamW LR of lm_head")
    g.add_argument("--matrix-lr", type=float, help="Muon LR of the block matrices")
    g.add_argument("--weight-decay", type=float, help="weight decay of the AdamW groups")
    g.add_argument("--momentum-warmup-steps", type=int, help="Muon momentum 0.85 -> 0.95 over this many steps")
    g = p.add_argument_group("checkpoints and runtime")
    g.add_argument("--save-every", type=int, help="checkpoint every N steps (<=0: at the end only)")
    g.add_argument("--keep-last", type=int, help="keep this many newest checkpoints")
    g.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint of this tag")
    g.add_argument("--tag", default=None, help="run name (default: the starting checkpoint's tag)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    g.add_argument("--dtype", default="auto", help="compute dtype: auto, bf16, fp32")
    g.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="torch.compile (auto: CUDA)")
    g.add_argument("--wandb", default=None, metavar="RUN", help="log to Weights & Biases under this run name")


def load_parent(args, world):
    """(model, tokenizer, meta, tag) of the checkpoint this stage starts from."""
    from picochat.runtime import log0
    from picochat.train.checkpoint import find_checkpoint, load_checkpoint_dir

    path = find_checkpoint(args.from_stage, args.from_tag, args.from_step)
    model, tokenizer, meta = load_checkpoint_dir(path, world.device)
    log0(f"starting from {path} ({model.num_params():,} params)")
    return model, tokenizer, meta, args.tag or meta.get("tag") or path.parent.name


def run_trainer(args, world, stage: str, tag: str, model, tokenizer, parent_meta: dict, batches, num_iterations: int,
                grad_accum: int, tokens_per_step: int, lr_multiplier, evaluate, dtype, loss_weighting: str,
                eval_every: int, extra_meta: dict) -> dict:
    """Build optimisers and the Trainer, resume if asked, run, and return the final metrics."""
    import torch

    from picochat.optim import build_optimizers
    from picochat.runtime import log0
    from picochat.train import checkpoint as ckpt
    from picochat.train.loop import LoopConfig, Trainer, wandb_logger
    from picochat.train.schedules import muon_momentum

    optimizers = build_optimizers(model, matrix_lr=args.matrix_lr, embedding_lr=args.embedding_lr,
                                  unembedding_lr=args.unembedding_lr, weight_decay=args.weight_decay)
    train_model = model
    if args.compile == "on" or (args.compile == "auto" and world.device.type == "cuda"):
        train_model = torch.compile(model, dynamic=False)
    cfg = LoopConfig(stage=stage, tag=tag, num_iterations=num_iterations, grad_accum_steps=grad_accum,
                     tokens_per_step=tokens_per_step, eval_every=eval_every, save_every=args.save_every,
                     keep_last=args.keep_last, loss_weighting=loss_weighting)
    run_meta = {"parent": {"stage": args.from_stage, "tag": parent_meta.get("tag"), "step": parent_meta.get("step")},
                "args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, **extra_meta}
    trainer = Trainer(model, optimizers, batches, cfg, world, tokenizer, lr_multiplier=lr_multiplier,
                      momentum=lambda s: muon_momentum(s, args.momentum_warmup_steps), evaluate=evaluate,
                      compute_dtype=dtype, train_model=train_model, run_meta=run_meta,
                      on_log=wandb_logger(args.wandb, stage, vars(args)) if world.is_main else None)
    if args.resume:
        steps = ckpt.list_steps(ckpt.run_dir(stage, tag))
        if steps:
            trainer.resume(ckpt.run_dir(stage, tag) / f"step_{steps[-1]}")
        else:
            log0(f"--resume: no checkpoint under {ckpt.run_dir(stage, tag)} yet; starting fresh")
    result = trainer.run()
    log0(f"done: {json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)})}")
    return result
