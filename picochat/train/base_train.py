"""`picochat base-train`: pretrain a GPT on the text shards.

    picochat base-train --preset cpu                      # ~15 min on a laptop
    torchrun --standalone --nproc_per_node=8 -m picochat base-train --preset d20

Horizon, in order of precedence: --time-budget (steps that fit in that many minutes at the
throughput measured over the first steps), --num-iterations, --target-flops,
--target-param-data-ratio. Before anything is allocated, the memory estimate of
`picochat plan` must fit the device (--no-plan-check skips it).
Checkpoints go to $PICOCHAT_HOME/checkpoints/base/<tag>/ (tag defaults to d<depth>).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import torch

from picochat.config import (
    ARCHITECTURE_FIELDS,
    add_architecture_arguments,
    add_device_arguments,
    add_preset_argument,
    resolve_pretraining,
)
from picochat.errors import ConfigError
from picochat.plan import (
    B_REF,
    add_plan_check_argument,
    auto_batch,
    batch_growth,
    explain_batch_divisibility,
    model_config,
    valid_batches,
)
from picochat.runtime import log0

DEFAULTS = {
    "depth": 20, "aspect_ratio": 64, "head_dim": 128, "n_kv_head": None, "max_seq_len": 2048,
    "device_batch_size": 32, "total_batch_size": 524288,
    "num_iterations": -1, "target_flops": -1.0, "target_param_data_ratio": 20.0,
    "embedding_lr": 0.2, "unembedding_lr": 0.004, "matrix_lr": 0.02, "weight_decay": 0.0,
    "warmup_steps": 0, "warmdown_ratio": 0.2, "final_lr_frac": 0.0, "momentum_warmup_steps": 300,
    "momentum_end": 0.95, "momentum_final": None, "muon_orthogonalizer": "newton_schulz", "muon_ns_steps": 5,
    "muon_eq": False, "muon_plus": False, "normuon": False, "normuon_beta2": 0.9, "cautious_wd": False,
    "muon_weight_decay": None, "weight_decay_schedule": "constant",
    "eval_every": 250, "eval_tokens": 20 * 524288, "sample_every": 2000, "save_every": -1, "keep_last": 2,
    "save_every_minutes": -1.0, "time_budget": -1.0, "loader": "packed",
    "scalar_lr": 0.5, "embedding_betas": None, "embedding_weight_decay": None, "unembedding_betas": None,
    "unembedding_weight_decay": None, "batch_lr_scale": "none",
    **{k: None for k in ARCHITECTURE_FIELDS},  # None: GPTConfig's default (the classic model)
    "vocab_size": None, "max_chars": None, "doc_cap": None,  # tokenizer keys shared by presets; unused here
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_preset_argument(p, recipe=True)
    g = p.add_argument_group("model")
    g.add_argument("--depth", type=int, help="number of transformer blocks (width and heads follow from it)")
    g.add_argument("--aspect-ratio", type=int, help="width = depth * aspect ratio, rounded up to --head-dim")
    g.add_argument("--head-dim", type=int, help="attention head dimension")
    g.add_argument("--n-kv-head", type=int, help="key/value heads for grouped-query attention (default: all)")
    g.add_argument("--max-seq-len", type=int, help="context length T")
    add_architecture_arguments(g)
    g = p.add_argument_group("batch and horizon")
    g.add_argument("--device-batch-size", type=int, help="sequences per micro-batch per process")
    g.add_argument("--total-batch-size", type=int, help="tokens per optimiser step (all processes, all micro-batches); "
                   "-1: 2^19 x (D / D_ref)^0.383 rounded to a power of 2, D the horizon's tokens, D_ref a depth-12 "
                   "model's at the same ratio")
    g.add_argument("--time-budget", type=float, metavar="MINUTES",
                   help="train for this many minutes: the horizon is set from the first steps' throughput, "
                   "then fixed (and kept on --resume); overrides the three below")
    g.add_argument("--num-iterations", type=int, help="optimiser steps (overrides the two below)")
    g.add_argument("--target-flops", type=float, help="training FLOPs budget")
    g.add_argument("--target-param-data-ratio", type=float, help="tokens per scaling parameter (Chinchilla: 20)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--embedding-lr", type=float, help="AdamW LR of the token embedding")
    g.add_argument("--unembedding-lr", type=float, help="AdamW LR of lm_head")
    g.add_argument("--matrix-lr", type=float, help="Muon LR of the block matrices")
    g.add_argument("--scalar-lr", type=float, help="AdamW LR of the x0 lambdas; the resid lambdas take 1/100 of it")
    for name in ("embedding", "unembedding"):
        g.add_argument(f"--{name}-betas", metavar="B1,B2", help=f"AdamW betas of the {name} (default 0.8,0.95)")
        g.add_argument(f"--{name}-weight-decay", type=float, help=f"AdamW weight decay of the {name} "
                       "(default --weight-decay)")
    g.add_argument("--batch-lr-scale", choices=["none", "sqrt"],
                   help="sqrt: every LR x sqrt(B / 2^19) and Muon's weight decay x sqrt(B / 2^19) x (D_ref / D), "
                   "the 2026 recipe's transfer from its tuning batch (default none)")
    g.add_argument("--weight-decay", type=float, help="weight decay of the AdamW groups (and of Muon's unless "
                   "--muon-weight-decay)")
    g.add_argument("--warmup-steps", type=int, help="linear LR warmup steps")
    g.add_argument("--warmdown-ratio", type=float, help="fraction of steps in the final linear warmdown")
    g.add_argument("--final-lr-frac", type=float, help="LR multiplier at the end of the warmdown")
    g.add_argument("--momentum-warmup-steps", type=int, help="Muon momentum 0.85 -> --momentum-end over this many steps")
    g.add_argument("--momentum-end", type=float, help="Muon momentum after the warmup (default 0.95)")
    g.add_argument("--momentum-final", type=float,
                   help="Muon momentum at the end, reached linearly over the LR warmdown (default: --momentum-end)")
    g.add_argument("--muon-orthogonalizer", choices=["newton_schulz", "polar_express"],
                   help="Muon's orthogonalisation: one fixed quintic repeated, or per-step quintics (Polar Express)")
    g.add_argument("--muon-ns-steps", type=int, help="orthogonalisation iterations (default 5)")
    g.add_argument("--muon-eq", action=argparse.BooleanOptionalAction,
                   help="equalise the update's row norms before orthogonalising (MuonEq)")
    g.add_argument("--muon-plus", action=argparse.BooleanOptionalAction,
                   help="rescale the orthogonalised update to Frobenius norm sqrt(min(rows, cols)) (Muon+)")
    g.add_argument("--normuon", action=argparse.BooleanOptionalAction,
                   help="even out the update's rows (columns of wide matrices) by their second moment (NorMuon)")
    g.add_argument("--normuon-beta2", type=float, help="EMA factor of NorMuon's second moment (default 0.9)")
    g.add_argument("--cautious-wd", action=argparse.BooleanOptionalAction,
                   help="Muon decays a weight only where the update has the weight's sign")
    g.add_argument("--muon-weight-decay", type=float, help="Muon's weight decay (default: --weight-decay)")
    g.add_argument("--weight-decay-schedule", choices=["constant", "cosine"],
                   help="Muon's weight decay over the run: constant, or a half cosine from full to 0")
    g = p.add_argument_group("eval and checkpoints")
    g.add_argument("--eval-every", type=int, help="val bpb every N steps (<=0: at the end only)")
    g.add_argument("--eval-tokens", type=int, help="val tokens per bpb evaluation")
    g.add_argument("--sample-every", type=int, help="greedy samples from fixed prompts every N steps")
    g.add_argument("--save-every", type=int, help="checkpoint every N steps (<=0: at the end only)")
    g.add_argument("--save-every-minutes", type=float,
                   help="also checkpoint when this many minutes of wall time passed since the last save (<=0: off)")
    g.add_argument("--keep-last", type=int, help="keep this many newest checkpoints")
    g.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint of this tag")
    g.add_argument("--tag", default=None, help="run name under checkpoints/base/ (default d<depth>)")
    g = p.add_argument_group("runtime")
    g.add_argument("--data-dir", default=None, help="shard directory (default $PICOCHAT_HOME/data/builtin)")
    g.add_argument("--loader", choices=["packed", "bestfit"],
                   help="how documents fill rows: packed (one stream, nothing dropped) or bestfit (every row "
                   "starts at <|bos|>, the longest document that fits, the rest cropped)")
    g.add_argument("--tokenizer-dir", default=None, help="tokenizer directory (default $PICOCHAT_HOME/tokenizer)")
    add_device_arguments(g)
    g.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile the model (auto: on for CUDA)")
    g.add_argument("--grad-reduce-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="dtype of the cross-rank gradient reduction (bf16 halves the traffic, e.g. across nodes; the sum is rounded to bf16)")
    g.add_argument("--seed", type=int, default=42, help="seed for weights and everything random")
    g.add_argument("--wandb", default=None, metavar="RUN", help="log to Weights & Biases under this run name")
    add_plan_check_argument(g)


def batch_and_scales(args, config) -> tuple[float, float]:
    """Fix an automatic --total-batch-size (-1) and return the (LR, Muon weight decay) factors.

    At a fixed tokens-per-parameter ratio the horizon D grows with the scaling parameters N, so
    D / D_ref = N / N_ref against a depth-12 model of the same options. The automatic batch is
    2^19 (D / D_ref)^0.383 rounded to a power of 2; with --batch-lr-scale sqrt every LR takes
    sqrt(B / 2^19) and Muon's weight decay sqrt(B / 2^19) (D_ref / D), which keeps B / (lr wd D) fixed.
    """
    growth = batch_growth(args, config)
    if args.total_batch_size == -1:
        args.total_batch_size = auto_batch(growth)
        log0(f"--total-batch-size -1: {args.total_batch_size:,} tokens per step (D / D_ref = {growth:.3f})")
    elif args.total_batch_size < 1:
        raise ConfigError(f"--total-batch-size {args.total_batch_size}: give tokens per step, or -1 for automatic")
    if args.batch_lr_scale == "none":
        return 1.0, 1.0
    lr_scale = math.sqrt(args.total_batch_size / B_REF)
    log0(f"--batch-lr-scale sqrt: LRs x {lr_scale:.4f}, Muon weight decay x {lr_scale / growth:.4f}")
    return lr_scale, lr_scale / growth


def adamw_groups(args, lr_scale: float) -> dict:
    """build_optimizers' keyword arguments for the AdamW groups the flags tune (LRs already scaled)."""
    from picochat.optim import RESID_LAMBDAS, X0_LAMBDAS, AdamWGroup

    out = {"resid_lambdas": dataclasses.replace(RESID_LAMBDAS, lr=args.scalar_lr * lr_scale / 100),
           "x0_lambdas": dataclasses.replace(X0_LAMBDAS, lr=args.scalar_lr * lr_scale)}
    for name in ("embedding", "unembedding"):
        betas, wd = getattr(args, f"{name}_betas"), getattr(args, f"{name}_weight_decay")
        if betas is None and wd is None:
            continue
        try:
            b1, b2 = (float(b) for b in (betas or "0.8,0.95").split(","))
        except ValueError:
            raise ConfigError(f"--{name}-betas {betas!r}: give two numbers, e.g. 0.8,0.95") from None
        out[name] = AdamWGroup(getattr(args, f"{name}_lr") * lr_scale, (b1, b2),
                               args.weight_decay if wd is None else wd, width_scaled=True)
    return out


def log_run(args, model, dtype, world, num_iterations: int, grad_accum: int) -> None:
    log0(f"model: {json.dumps(model.config.to_dict())}")
    log0(f"params {model.num_params():,} (scaling {model.num_scaling_params():,}) | "
         f"flops/token {model.flops_per_token():.3e} | dtype {dtype} | device {world.device} | world {world.world_size}")
    if num_iterations > 0:
        log0(f"horizon: {num_iterations} steps x {args.total_batch_size:,} tokens = "
             f"{num_iterations * args.total_batch_size:,} tokens "
             f"({num_iterations * args.total_batch_size / model.num_scaling_params():.1f} tokens/param), "
             f"grad accum {grad_accum}")
    else:
        log0(f"horizon: what fits in --time-budget {args.time_budget:g} min, set after the first steps; "
             f"{args.total_batch_size:,} tokens per step, grad accum {grad_accum}")


def optimizers_for(args, model, lr_scale: float, wd_scale: float) -> list:
    """AdamW + Muon as the flags say, LRs and Muon's decay times the batch transfer factors."""
    from picochat.optim import MuonOptions, build_optimizers

    muon_options = MuonOptions(orthogonalizer=args.muon_orthogonalizer, ns_steps=args.muon_ns_steps,
                               row_equilibration=args.muon_eq, renormalize=args.muon_plus,
                               normuon_beta2=args.normuon_beta2 if args.normuon else None,
                               cautious_weight_decay=args.cautious_wd)
    muon_wd = args.weight_decay if args.muon_weight_decay is None else args.muon_weight_decay
    return build_optimizers(model, matrix_lr=args.matrix_lr * lr_scale, embedding_lr=args.embedding_lr * lr_scale,
                            unembedding_lr=args.unembedding_lr * lr_scale, weight_decay=args.weight_decay,
                            muon_options=muon_options, muon_weight_decay=muon_wd * wd_scale,
                            **adamw_groups(args, lr_scale))


def evaluators(args, world, tokenizer, val_file, dtype):
    """(val bpb and its standard error over --eval-tokens of the val shard, greedy samples of fixed prompts
    on rank 0) for the loop."""
    from picochat.data.loader import PackedLoader
    from picochat.eval.bpb import evaluate_bpb_with_se
    from picochat.eval.samples import sample_prompts

    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.long, device=world.device)
    eval_steps = args.eval_tokens // (args.device_batch_size * args.max_seq_len * world.world_size)
    if eval_steps < 1:
        raise ConfigError(f"--eval-tokens {args.eval_tokens} is less than one batch "
                          f"({args.device_batch_size}*{args.max_seq_len}*{world.world_size} tokens); raise it")

    def evaluate(m, step):
        val = PackedLoader([val_file], tokenizer, args.device_batch_size, args.max_seq_len,
                           world.rank, world.world_size, world.device)
        try:
            bpb, se = evaluate_bpb_with_se(m, val, eval_steps, token_bytes, dtype)
            return {"val_bpb": bpb, **({"val_bpb_se": se} if math.isfinite(se) else {})}  # one batch: no spread
        finally:
            val.close()

    def sample(m, step):
        if world.is_main:
            for s in sample_prompts(m, tokenizer, compute_dtype=dtype):
                log0(f"  sample | {s['prompt']}{s['completion']!r}")

    return evaluate, sample


def horizon_tokens(args) -> int:
    """Training tokens of the horizon the flags ask for; 0 when a time budget sets it at run time."""
    from picochat.model.gpt import GPT

    if args.time_budget and args.time_budget > 0:
        return 0
    config = model_config(args, args.vocab_size or 32768)
    batch_and_scales(args, config)
    if args.num_iterations and args.num_iterations > 0:
        return args.num_iterations * args.total_batch_size
    with torch.device("meta"):
        model = GPT(config)
    return compute_horizon(args, model, 1)[0] * args.total_batch_size


def compute_horizon(args, model, world_size: int) -> tuple[int, int]:
    """(num_iterations, grad_accum_steps) from the flags; with a time budget the loop sets the horizon."""
    grad_accum = check_batch(args, world_size)
    if args.time_budget and args.time_budget > 0:
        return -1, grad_accum
    if args.num_iterations and args.num_iterations > 0:
        return args.num_iterations, grad_accum
    if args.target_flops and args.target_flops > 0:
        n = round(args.target_flops / (model.flops_per_token() * args.total_batch_size))
    elif args.target_param_data_ratio and args.target_param_data_ratio > 0:
        n = int(args.target_param_data_ratio * model.num_scaling_params()) // args.total_batch_size
    else:
        raise ConfigError("set one of --num-iterations, --target-flops, --target-param-data-ratio")
    if n < 1:
        raise ConfigError("the horizon works out to 0 steps; raise the budget or lower --total-batch-size")
    return n, grad_accum


def check_batch(args, world_size: int) -> int:
    """Micro-batches per step, or a ConfigError naming the flag to change for this world size.

    A device batch that came from the preset (not from --device-batch-size) is lowered to the
    largest one that divides the step at this world size, so d20 runs on 16 GPUs as it is.
    """
    problem = explain_batch_divisibility(args.total_batch_size, args.device_batch_size, args.max_seq_len,
                                         world_size, "--total-batch-size")
    if problem and not getattr(args, "_batch_from_flag", True):
        smaller = [b for b in valid_batches(args.total_batch_size, args.max_seq_len, world_size)
                   if b < args.device_batch_size]
        if smaller:
            log0(f"the preset's device batch {args.device_batch_size} does not divide --total-batch-size "
                 f"{args.total_batch_size} over {world_size} processes; using --device-batch-size {smaller[-1]}")
            args.device_batch_size, problem = smaller[-1], None
    if problem:
        raise ConfigError(problem)
    return args.total_batch_size // (args.device_batch_size * args.max_seq_len * world_size)


def check_memory(args, config, world, compiled: bool, dtype) -> None:
    """The plan's memory estimate must fit this device; else name --device-batch-size and a value that fits."""
    import torch

    from picochat.plan import Shape, check_fits

    if args.no_plan_check:
        return
    shape = Shape.from_config(config, args.device_batch_size, world_size=world.world_size, compiled=compiled,
                              bf16=dtype != torch.float32, total_batch_tokens=args.total_batch_size)
    check_fits(shape, world.device, "--device-batch-size",
               valid_batches(args.total_batch_size, args.max_seq_len, world.world_size))


def resolve_base_args(args: argparse.Namespace) -> argparse.Namespace:
    """config.resolve_pretraining with base training's defaults (and a note of whether the device
    batch came from the command line, for check_batch)."""
    args._batch_from_flag = getattr(args, "device_batch_size", None) is not None
    return resolve_pretraining(args, DEFAULTS)


def run(args: argparse.Namespace) -> int:
    resolve_base_args(args)
    from picochat.mfu import use_expandable_segments

    use_expandable_segments()  # before CUDA is initialised
    from picochat.data.loader import make_loader
    from picochat.data.shards import default_data_dir, list_shards
    from picochat.model.gpt import build_model
    from picochat.optim import muon_momentum
    from picochat.optim.distributed import broadcast_parameters
    from picochat.runtime import (
        home,
        init_distributed,
        pick_dtype,
        seed_everything,
        shutdown_distributed,
    )
    from picochat.tokenizer import Tokenizer
    from picochat.train.loop import LoopConfig, Trainer, verify_shared_home, wandb_logger
    from picochat.train.schedules import cosine_to_zero, warmup_constant_warmdown

    world = init_distributed(args.device)
    try:
        verify_shared_home(world)
        dtype = pick_dtype(world.device, args.dtype)
        seed_everything(args.seed)
        tokenizer = Tokenizer.load(args.tokenizer_dir or home() / "tokenizer")
        train_files, val_file = list_shards(args.data_dir or default_data_dir())
        config = model_config(args, tokenizer.vocab_size)
        lr_scale, wd_scale = batch_and_scales(args, config)
        compiled = args.compile == "on" or (args.compile == "auto" and world.device.type == "cuda")
        check_batch(args, world.world_size)
        check_memory(args, config, world, compiled, dtype)
        model = build_model(config, world.device)
        broadcast_parameters(model)
        num_iterations, grad_accum = compute_horizon(args, model, world.world_size)
        tag = args.tag or f"d{args.depth}"
        log_run(args, model, dtype, world, num_iterations, grad_accum)
        optimizers = optimizers_for(args, model, lr_scale, wd_scale)
        train_model = model
        if compiled:
            train_model = torch.compile(model, dynamic=False)
        batches = make_loader(args.loader, train_files, tokenizer, args.device_batch_size, args.max_seq_len,
                              world.rank, world.world_size, world.device)
        evaluate, sample = evaluators(args, world, tokenizer, val_file, dtype)
        loop_cfg = LoopConfig(stage="base", tag=tag, num_iterations=num_iterations, grad_accum_steps=grad_accum,
                              tokens_per_step=args.total_batch_size, eval_every=args.eval_every,
                              sample_every=args.sample_every, save_every=args.save_every, keep_last=args.keep_last,
                              save_every_minutes=args.save_every_minutes, time_budget_s=60 * args.time_budget,
                              grad_reduce_dtype=args.grad_reduce_dtype)
        fingerprint = {"data_dir": str(train_files[0].parent), "train_files": [f.name for f in train_files],
                       "val_file": val_file.name}
        trainer = Trainer(
            model, optimizers, batches, loop_cfg, world, tokenizer,
            lr_multiplier=lambda s, n: warmup_constant_warmdown(s, n, args.warmup_steps, args.warmdown_ratio,
                                                                args.final_lr_frac),
            # The trainer's horizon: a time budget fixes it only after the first steps.
            momentum=lambda s: muon_momentum(s, args.momentum_warmup_steps, end=args.momentum_end,
                                             final=args.momentum_final, warmdown_ratio=args.warmdown_ratio,
                                             num_iterations=trainer.num_iterations),
            weight_decay_multiplier=cosine_to_zero if args.weight_decay_schedule == "cosine" else None,
            evaluate=evaluate,
            sample=sample if args.sample_every != 0 else None,
            compute_dtype=dtype, train_model=train_model,
            on_log=wandb_logger(args.wandb, "base", vars(args)) if world.is_main else None,
            run_meta={"data": fingerprint, "args": {k: v for k, v in vars(args).items() if not k.startswith("_")}},
        )
        if args.resume:
            trainer.resume_newest()
        result = trainer.run()
        batches.close()
        log0(f"done: {json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)})}")
        return 0
    finally:
        shutdown_distributed()


