"""`picochat base-loss`: train/val bits-per-byte of a base checkpoint, plus greedy samples.

    picochat base-loss                      # newest base checkpoint
    picochat base-loss --tag d4 --step 1500 --split-tokens 262144

Writes $PICOCHAT_HOME/eval/base_loss_<tag>_step<N>.json.

Which val bpb is which: both this command and the in-training eval read the val shard from
its first token, in rows of the same sequence length, so with `--split-tokens` equal to the
training run's `--eval-tokens` (the cpu speedrun passes it) they score the very same tokens
and the last in-training eval equals this val bpb. The JSON records the training eval's token
count and last value next to ours, and the standard error of each split's bpb across its
batches (a ratio estimate: batch i has bpb b_i over B_i bytes), so a difference can be read
against the noise. Consecutive batches can come from one document, so the standard error is
a lower bound on the true sampling error.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator

import torch

from picochat.errors import ConfigError, DataError


def bpb_with_standard_error(batches: list[tuple[float, float]]) -> tuple[float, float]:
    """(bpb, standard error) over batches [(bpb_i, bytes_i)]: the byte-weighted mean and its
    ratio-estimator standard error sqrt(n/(n-1) * sum(w_i^2 (b_i - bpb)^2)), w_i = bytes_i / sum(bytes)."""
    total = sum(nbytes for _, nbytes in batches)
    if not batches or total <= 0:
        raise DataError("bpb over zero bytes of text; evaluate more tokens")
    mean = sum(b * nbytes for b, nbytes in batches) / total
    n = len(batches)
    if n < 2:
        return mean, float("nan")
    spread = sum((nbytes / total) ** 2 * (b - mean) ** 2 for b, nbytes in batches)
    return mean, math.sqrt(spread * n / (n - 1))


def per_batch_bpb(model, loader: Iterator, steps: int, token_bytes: torch.Tensor,
                  dtype: torch.dtype) -> list[tuple[float, float]]:
    """[(bpb, bytes)] of each of `steps` batches (summed over ranks), through the one evaluate_bpb."""
    import torch.distributed as dist

    from picochat.eval.bpb import evaluate_bpb

    out = []
    for _ in range(steps):
        x, y = next(loader)
        nbytes = torch.where(y >= 0, token_bytes[y.clamp(min=0)], torch.zeros_like(y)).sum().double()
        if dist.is_initialized():
            dist.all_reduce(nbytes)
        out.append((evaluate_bpb(model, iter([(x, y)]), 1, token_bytes, dtype), nbytes.item()))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tag", default=None, help="base run tag (default: the newest)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--split-tokens", type=int, default=393216,
                   help="tokens evaluated per split (train and val); the cpu preset's --eval-tokens by default")
    p.add_argument("--device-batch-size", type=int, default=None, help="sequences per batch (default: 8)")
    p.add_argument("--data-dir", default=None, help="shard directory (default $PICOCHAT_HOME/data/builtin)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens per greedy sample")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto, bf16, fp32")


def run(args: argparse.Namespace) -> int:
    from picochat.checkpoint import find_checkpoint, load_checkpoint_dir
    from picochat.data.loader import PackedLoader
    from picochat.data.shards import default_data_dir, list_shards
    from picochat.eval.samples import sample_prompts
    from picochat.runtime import home, init_distributed, log0, pick_dtype, shutdown_distributed

    world = init_distributed(args.device)
    try:
        dtype = pick_dtype(world.device, args.dtype)
        path = find_checkpoint("base", args.tag, args.step)
        model, tokenizer, meta = load_checkpoint_dir(path, world.device)
        T = model.config.sequence_len
        B = args.device_batch_size or 8
        steps = args.split_tokens // (B * T * world.world_size)
        if steps < 1:
            raise ConfigError(f"--split-tokens {args.split_tokens} is less than one batch ({B}*{T}*{world.world_size} "
                              "tokens); raise it")
        train_files, val_file = list_shards(args.data_dir or default_data_dir())
        token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.long, device=world.device)
        results: dict = {"checkpoint": str(path), "step": meta["step"], "tokens_per_split": steps * B * T * world.world_size,
                         "batches_per_split": steps, **training_eval(meta)}
        for split, files in (("train", train_files), ("val", [val_file])):
            loader = PackedLoader(files, tokenizer, B, T, world.rank, world.world_size, world.device)
            results[f"{split}_bpb"], results[f"{split}_bpb_se"] = bpb_with_standard_error(
                per_batch_bpb(model, loader, steps, token_bytes, dtype))
            loader.close()
            log0(f"{split} bpb: {results[f'{split}_bpb']:.4f} ± {results[f'{split}_bpb_se']:.4f} (standard error "
                 f"over {steps} batches)")
        if results.get("training_eval_tokens") == results["tokens_per_split"]:
            log0(f"val: the same {results['tokens_per_split']:,} tokens as the in-training eval "
                 f"(its last value: {results.get('training_eval_val_bpb')})")
        if world.is_main:
            results["samples"] = sample_prompts(model, tokenizer, max_new_tokens=args.max_new_tokens, compute_dtype=dtype)
            for s in results["samples"]:
                log0(f"{s['prompt']}{s['completion']!r}")
            out = home() / "eval" / f"base_loss_{meta.get('tag', path.parent.name)}_step{meta['step']}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1))
            log0(f"wrote {out}")
        return 0
    finally:
        shutdown_distributed()


def training_eval(meta: dict) -> dict:
    """The in-training eval of the checkpoint: its token count and its last val bpb, where recorded."""
    out = {}
    tokens = (meta.get("args") or {}).get("eval_tokens")
    if isinstance(tokens, int):
        out["training_eval_tokens"] = tokens
    bpb = (meta.get("metrics") or {}).get("val_bpb")
    if isinstance(bpb, (int, float)):
        out["training_eval_val_bpb"] = bpb
    return out
