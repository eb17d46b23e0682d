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
from dataclasses import dataclass
from typing import ClassVar

import torch

from picochat.config import ModelOptions, add_preset_argument, option
from picochat.data.loader import LOADERS, PackedLoader, make_loader
from picochat.data.shards import default_data_dir, list_shards
from picochat.errors import ConfigError
from picochat.eval.bpb import evaluate_bpb_with_se
from picochat.eval.samples import sample_prompts
from picochat.model.fp8 import convert_to_fp8, fp8_decision
from picochat.model.gpt import GPT, build_model, compiled_for_training
from picochat.optim import RESID_LAMBDAS, X0_LAMBDAS, AdamWGroup, build_optimizers, muon_momentum
from picochat.optim.distributed import broadcast_parameters
from picochat.plan import B_REF, auto_batch, batch_growth, explain_batch_divisibility, valid_batches
from picochat.runtime import home, log0, pick_training_dtype
from picochat.tokenizer import Tokenizer
from picochat.train.chat_stage import check_memory, stage_world
from picochat.train.loop import LoopConfig, Trainer, wandb_logger
from picochat.train.options import LoopOptions, muon_options_from_flags
from picochat.train.schedules import cosine_to_zero, warmup_constant_warmdown

BATCH, OPTIM, SAVE, RUN = "batch and horizon", "optimisation", "eval and checkpoints", "runtime"


@dataclass
class BaseTrainConfig(ModelOptions, LoopOptions):
    """Every setting of a pretraining run; `picochat base-train --help` lists them as flags."""

    PRETRAINING: ClassVar[bool] = True

    recipe: str | None = option(None, "the --recipe the options came from", cli=False)
    device_batch_size: int = option(32, "sequences per micro-batch per process", group=BATCH, minimum=1)
    total_batch_size: int = option(
        524288, "tokens per optimiser step (all processes, all micro-batches); -1: 2^19 x (D / D_ref)^0.383 "
        "rounded to a power of 2, D the horizon's tokens, D_ref a depth-12 model's at the same ratio", group=BATCH)
    num_iterations: int = option(-1, "optimiser steps (overrides the two below)", group=BATCH)
    target_flops: float = option(-1.0, "training FLOPs budget", group=BATCH)
    target_param_data_ratio: float = option(20.0, "tokens per scaling parameter (Chinchilla: 20)", group=BATCH)
    scalar_lr: float = option(0.5, "AdamW LR of the x0 lambdas; the resid lambdas take 1/100 of it", group=OPTIM)
    embedding_betas: str | None = option(None, "AdamW betas of the embedding (default 0.8,0.95)", group=OPTIM,
                                         metavar="B1,B2")
    embedding_weight_decay: float | None = option(
        None, "AdamW weight decay of the embedding (default --weight-decay)", group=OPTIM)
    unembedding_betas: str | None = option(None, "AdamW betas of lm_head (default 0.8,0.95)", group=OPTIM,
                                           metavar="B1,B2")
    unembedding_weight_decay: float | None = option(
        None, "AdamW weight decay of lm_head (default --weight-decay)", group=OPTIM)
    batch_lr_scale: str = option(
        "none", "sqrt: every LR (but the smear/backout scalars' 0.2) x sqrt(B / 2^19) and Muon's weight decay x "
        "sqrt(B / 2^19) x (D_ref / D), the 2026 recipe's transfer from its tuning batch", group=OPTIM,
        choices=("none", "sqrt"))
    warmup_steps: int = option(0, "linear LR warmup steps", group=OPTIM)
    warmdown_ratio: float = option(0.2, "fraction of steps in the final linear warmdown", group=OPTIM)
    final_lr_frac: float = option(0.0, "LR multiplier at the end of the warmdown", group=OPTIM)
    momentum_end: float = option(0.95, "Muon momentum after the warmup", group=OPTIM)
    momentum_final: float | None = option(
        None, "Muon momentum at the end, reached linearly over the LR warmdown (default: --momentum-end)",
        group=OPTIM)
    muon_orthogonalizer: str = option(
        "newton_schulz", "Muon's orthogonalisation: one fixed quintic repeated, or per-step quintics (Polar "
        "Express)", group=OPTIM, choices=("newton_schulz", "polar_express"))
    muon_ns_steps: int = option(5, "orthogonalisation iterations", group=OPTIM)
    muon_eq: bool = option(False, "equalise the update's row norms before orthogonalising (MuonEq)", group=OPTIM)
    muon_plus: bool = option(
        False, "rescale the orthogonalised update to Frobenius norm sqrt(min(rows, cols)) (Muon+)", group=OPTIM)
    normuon: bool = option(
        False, "even out the update's rows (columns of wide matrices) by their second moment (NorMuon)", group=OPTIM)
    normuon_beta2: float = option(0.9, "EMA factor of NorMuon's second moment", group=OPTIM)
    cautious_wd: bool = option(False, "Muon decays a weight only where the update has the weight's sign",
                               group=OPTIM)
    muon_weight_decay: float | None = option(None, "Muon's weight decay (default: --weight-decay)", group=OPTIM)
    weight_decay_schedule: str = option(
        "constant", "Muon's weight decay over the run: constant, or a half cosine from full to 0", group=OPTIM,
        choices=("constant", "cosine"))
    eval_every: int = option(250, "val bpb every N steps (<=0: at the end only)", group=SAVE)
    eval_tokens: int = option(20 * 524288, "val tokens per bpb evaluation", group=SAVE)
    sample_every: int = option(2000, "greedy samples from fixed prompts every N steps (0: never)", group=SAVE)
    tag: str | None = option(None, "run name under checkpoints/base/ (default d<depth>)", group=SAVE)
    data_dir: str | None = option(None, "shard directory (default $PICOCHAT_HOME/data/builtin)", group=RUN)
    loader: str = option(
        "packed", "how documents fill rows: packed (one stream, nothing dropped), bestfit (every row starts at "
        "<|bos|>, the longest document that fits, the rest cropped) or aligned (best-fit rows of each document's "
        "first T+1 tokens, mixed with packed rows of the rest)", group=RUN, choices=LOADERS)
    tail_keep: float = option(
        1.0, "aligned rows: the share of documents whose text beyond the first T+1 tokens the first epoch trains "
        "on (the rest give only their heads: more document starts, more documents for the same tokens); later "
        "epochs train on every tail", group=RUN)
    tokenizer_dir: str | None = option(None, "tokenizer directory (default $PICOCHAT_HOME/tokenizer)", group=RUN)
    fp8: str = option(
        "off", "train the block matmuls in float8 with per-tensor scales (on; auto: where the GPU has FP8 tensor "
        "cores, compute capability 8.9+); lm_head, evals and checkpoints stay as they are", group=RUN,
        choices=("off", "on", "auto"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_preset_argument(p, recipe=True)
    BaseTrainConfig.add_arguments(p)


def batch_and_scales(cfg: BaseTrainConfig, config) -> tuple[float, float]:
    """Fix an automatic --total-batch-size (-1) and return the (LR, Muon weight decay) factors.

    At a fixed tokens-per-parameter ratio the horizon D grows with the scaling parameters N, so
    D / D_ref = N / N_ref against a depth-12 model of the same options. The automatic batch is
    2^19 (D / D_ref)^0.383 rounded to a power of 2; with --batch-lr-scale sqrt every LR takes
    sqrt(B / 2^19) (but the smear/backout scalars', which the 2026 recipe leaves at 0.2) and Muon's weight decay sqrt(B / 2^19) (D_ref / D), which keeps B / (lr wd D) fixed.
    """
    growth = batch_growth(cfg, config)
    if cfg.total_batch_size == -1:
        cfg.total_batch_size = auto_batch(growth)
        log0(f"--total-batch-size -1: {cfg.total_batch_size:,} tokens per step (D / D_ref = {growth:.3f})")
    elif cfg.total_batch_size < 1:
        raise ConfigError(f"--total-batch-size {cfg.total_batch_size}: give tokens per step, or -1 for automatic")
    if cfg.batch_lr_scale == "none":
        return 1.0, 1.0
    lr_scale = math.sqrt(cfg.total_batch_size / B_REF)
    log0(f"--batch-lr-scale sqrt: LRs x {lr_scale:.4f}, Muon weight decay x {lr_scale / growth:.4f}")
    return lr_scale, lr_scale / growth


def adamw_groups(cfg: BaseTrainConfig, lr_scale: float) -> dict:
    """build_optimizers' keyword arguments for the AdamW groups the flags tune (LRs already scaled)."""
    out = {"resid_lambdas": dataclasses.replace(RESID_LAMBDAS, lr=cfg.scalar_lr * lr_scale / 100),
           "x0_lambdas": dataclasses.replace(X0_LAMBDAS, lr=cfg.scalar_lr * lr_scale)}
    for name in ("embedding", "unembedding"):
        betas, wd = getattr(cfg, f"{name}_betas"), getattr(cfg, f"{name}_weight_decay")
        if betas is None and wd is None:
            continue
        try:
            b1, b2 = (float(b) for b in (betas or "0.8,0.95").split(","))
        except ValueError:
            raise ConfigError(f"--{name}-betas {betas!r}: give two numbers, e.g. 0.8,0.95") from None
        out[name] = AdamWGroup(getattr(cfg, f"{name}_lr") * lr_scale, (b1, b2),
                               cfg.weight_decay if wd is None else wd, width_scaled=True)
    return out


def log_run(cfg: BaseTrainConfig, model, dtype, world, num_iterations: int, grad_accum: int, compiled: bool) -> None:
    log0(f"model: {json.dumps(model.config.to_dict())}")
    log0(f"params {model.num_params():,} (scaling {model.num_scaling_params():,}) | "
         f"flops/token {model.flops_per_token():.3e} | dtype {dtype} | device {world.device} | world {world.world_size}"
         f" | {'compiled' if compiled else 'eager'} (--compile {cfg.compile})")
    if num_iterations > 0:
        log0(f"horizon: {num_iterations} steps x {cfg.total_batch_size:,} tokens = "
             f"{num_iterations * cfg.total_batch_size:,} tokens "
             f"({num_iterations * cfg.total_batch_size / model.num_scaling_params():.1f} tokens/param), "
             f"grad accum {grad_accum}")
    else:
        log0(f"horizon: what fits in --time-budget {cfg.time_budget:g} min, set after the first steps; "
             f"{cfg.total_batch_size:,} tokens per step, grad accum {grad_accum}")


def use_fp8(cfg: BaseTrainConfig, model, device) -> None:
    """Convert the block matmuls to fp8 training if --fp8 says so on this device, and say what was converted."""
    if not fp8_decision(cfg.fp8, device):
        return
    names = convert_to_fp8(model)
    total = sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear))
    log0(f"fp8: {len(names)} of {total} linear layers train in float8 (e4m3 forward, e5m2 gradients, one scale "
         "per tensor); lm_head and the smaller layers stay in the compute dtype; MFU stays against the bf16 peak"
         + ("; on a CPU the fp8 matmuls run slower than bf16 (for checks only)" if device.type == "cpu" else ""))


def muon_options_for(cfg: BaseTrainConfig):
    """Muon's update rule as the flags say (recorded in every checkpoint; later stages train with it)."""
    return muon_options_from_flags(cfg.to_dict())


def optimizers_for(cfg: BaseTrainConfig, model, lr_scale: float, wd_scale: float) -> list:
    """AdamW + Muon as the flags say, LRs and Muon's decay times the batch transfer factors."""
    muon_wd = cfg.weight_decay if cfg.muon_weight_decay is None else cfg.muon_weight_decay
    return build_optimizers(model, matrix_lr=cfg.matrix_lr * lr_scale, embedding_lr=cfg.embedding_lr * lr_scale,
                            unembedding_lr=cfg.unembedding_lr * lr_scale, weight_decay=cfg.weight_decay,
                            muon_options=muon_options_for(cfg), muon_weight_decay=muon_wd * wd_scale,
                            **adamw_groups(cfg, lr_scale))


def evaluators(cfg: BaseTrainConfig, world, tokenizer, val_file, dtype):
    """(val bpb and its standard error over --eval-tokens of the val shard, greedy samples of fixed prompts
    on rank 0) for the loop."""
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.long, device=world.device)
    eval_steps = cfg.eval_tokens // (cfg.device_batch_size * cfg.max_seq_len * world.world_size)
    if eval_steps < 1:
        raise ConfigError(f"--eval-tokens {cfg.eval_tokens} is less than one batch "
                          f"({cfg.device_batch_size}*{cfg.max_seq_len}*{world.world_size} tokens); raise it")

    def evaluate(m, step):
        val = PackedLoader([val_file], tokenizer, cfg.device_batch_size, cfg.max_seq_len,
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


def horizon_tokens(cfg: BaseTrainConfig, vocab_size: int = 32768) -> int:
    """Training tokens of the horizon the options ask for; 0 when a time budget sets it at run time."""
    if cfg.time_budget and cfg.time_budget > 0:
        return 0
    config = cfg.model_config(vocab_size)
    batch_and_scales(cfg, config)
    if cfg.num_iterations and cfg.num_iterations > 0:
        return cfg.num_iterations * cfg.total_batch_size
    with torch.device("meta"):
        model = GPT(config)
    return compute_horizon(cfg, model, 1)[0] * cfg.total_batch_size


def compute_horizon(cfg: BaseTrainConfig, model, world_size: int) -> tuple[int, int]:
    """(num_iterations, grad_accum_steps) from the flags; with a time budget the loop sets the horizon."""
    grad_accum = check_batch(cfg, world_size)
    if cfg.time_budget and cfg.time_budget > 0:
        return -1, grad_accum
    if cfg.num_iterations and cfg.num_iterations > 0:
        return cfg.num_iterations, grad_accum
    if cfg.target_flops and cfg.target_flops > 0:
        n = round(cfg.target_flops / (model.flops_per_token() * cfg.total_batch_size))
    elif cfg.target_param_data_ratio and cfg.target_param_data_ratio > 0:
        n = int(cfg.target_param_data_ratio * model.num_scaling_params()) // cfg.total_batch_size
    else:
        raise ConfigError("set one of --num-iterations, --target-flops, --target-param-data-ratio")
    if n < 1:
        raise ConfigError("the horizon works out to 0 steps; raise the budget or lower --total-batch-size")
    return n, grad_accum


def lower_preset_batch(cfg, step_flag: str, choices: list[int], world_size: int) -> bool:
    """Lower a device batch that came from the preset (not from --device-batch-size) to the largest of
    `choices` below it, and say so; False when it came from the flag or none is smaller.

    `step_flag` is the flag and value of the step the batch does not divide at this world size.
    """
    smaller = [b for b in choices if b < cfg.device_batch_size]
    if cfg.batch_from_flag or not smaller:
        return False
    log0(f"the preset's device batch {cfg.device_batch_size} does not divide {step_flag} over {world_size} "
         f"processes; using --device-batch-size {smaller[-1]}")
    cfg.device_batch_size = smaller[-1]
    return True


def check_batch(cfg, world_size: int, seq_len: int | None = None) -> int:
    """Micro-batches per step of --total-batch-size tokens in rows of `seq_len` (default --max-seq-len),
    or a ConfigError naming the flag to change for this world size.

    A device batch that came from the preset (not from --device-batch-size) is lowered to the
    largest one that divides the step at this world size, so d20 runs on 16 GPUs as it is.
    """
    T = seq_len or cfg.max_seq_len
    problem = explain_batch_divisibility(cfg.total_batch_size, cfg.device_batch_size, T, world_size,
                                         "--total-batch-size")
    if problem and not lower_preset_batch(cfg, f"--total-batch-size {cfg.total_batch_size}",
                                          valid_batches(cfg.total_batch_size, T, world_size), world_size):
        raise ConfigError(problem)
    return cfg.total_batch_size // (cfg.device_batch_size * T * world_size)


def loader_options(cfg: BaseTrainConfig, tail_keep_given: bool) -> dict:
    """make_loader's keywords beyond the shape, or a ConfigError for a --tail-keep that cannot apply (a
    preset's share belongs to its aligned rows and is dropped with another --loader)."""
    if not 0.0 <= cfg.tail_keep <= 1.0:
        raise ConfigError(f"--tail-keep {cfg.tail_keep}: give a share between 0 (heads only) and 1 (every tail)")
    if cfg.loader != "aligned" and tail_keep_given and cfg.tail_keep != 1.0:
        raise ConfigError(f"--tail-keep applies to --loader aligned, not {cfg.loader}; drop --tail-keep or use "
                          "--loader aligned")
    return {"tail_keep": cfg.tail_keep} if cfg.loader == "aligned" else {}


def run(args: argparse.Namespace) -> int:
    tail_keep_given = getattr(args, "tail_keep", None) is not None
    cfg = BaseTrainConfig.from_args(args)
    loader_kwargs = loader_options(cfg, tail_keep_given)
    with stage_world(cfg) as world:
        dtype = pick_training_dtype(world.device, cfg.dtype)
        tokenizer = Tokenizer.load(cfg.tokenizer_dir or home() / "tokenizer")
        train_files, val_file = list_shards(cfg.data_dir or default_data_dir())
        config = cfg.model_config(tokenizer.vocab_size)
        lr_scale, wd_scale = batch_and_scales(cfg, config)
        compiled = cfg.compiles(world.device.type, dtype)
        check_batch(cfg, world.world_size)
        check_memory(cfg, world, dtype, compiled, config,
                     lambda c: valid_batches(cfg.total_batch_size, c.sequence_len, world.world_size))
        model = build_model(config, world.device)
        use_fp8(cfg, model, world.device)
        broadcast_parameters(model)
        num_iterations, grad_accum = compute_horizon(cfg, model, world.world_size)
        log_run(cfg, model, dtype, world, num_iterations, grad_accum, compiled)
        optimizers = optimizers_for(cfg, model, lr_scale, wd_scale)
        train_model = compiled_for_training(model, dynamic=False) if compiled else model
        batches = make_loader(cfg.loader, train_files, tokenizer, cfg.device_batch_size, cfg.max_seq_len,
                              world.rank, world.world_size, world.device, **loader_kwargs)
        evaluate, sample = evaluators(cfg, world, tokenizer, val_file, dtype)
        loop_cfg = LoopConfig(stage="base", tag=cfg.tag or f"d{cfg.depth}", num_iterations=num_iterations,
                              grad_accum_steps=grad_accum, tokens_per_step=cfg.total_batch_size,
                              eval_every=cfg.eval_every, sample_every=cfg.sample_every,
                              save_every=cfg.save_every, keep_last=cfg.keep_last,
                              save_every_minutes=cfg.save_every_minutes, time_budget_s=60 * cfg.time_budget,
                              grad_reduce_dtype=cfg.grad_reduce_dtype)
        fingerprint = {"data_dir": str(train_files[0].parent), "train_files": [f.name for f in train_files],
                       "val_file": val_file.name}
        trainer = Trainer(
            model, optimizers, batches, loop_cfg, world, tokenizer, compute_dtype=dtype,
            lr_multiplier=lambda s, n: warmup_constant_warmdown(s, n, cfg.warmup_steps, cfg.warmdown_ratio,
                                                                cfg.final_lr_frac),
            # The trainer's horizon: a time budget fixes it only after the first steps.
            momentum=lambda s: muon_momentum(s, cfg.momentum_warmup_steps, end=cfg.momentum_end,
                                             final=cfg.momentum_final, warmdown_ratio=cfg.warmdown_ratio,
                                             num_iterations=trainer.num_iterations),
            weight_decay_multiplier=cosine_to_zero if cfg.weight_decay_schedule == "cosine" else None,
            evaluate=evaluate, sample=sample if cfg.sample_every != 0 else None, train_model=train_model,
            on_log=wandb_logger(cfg.wandb, "base", cfg.to_dict()) if world.is_main else None,
            run_meta={"data": fingerprint, "args": cfg.to_dict(), "muon": dataclasses.asdict(muon_options_for(cfg))},
        )
        trainer.resume_and_run(cfg.resume)
        batches.close()
        return 0


