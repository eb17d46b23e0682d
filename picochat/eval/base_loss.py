"""`picochat base-loss`: train/val bits-per-byte of a base checkpoint, plus greedy samples.

    picochat base-loss                      # newest base checkpoint
    picochat base-loss --tag d4 --step 1500 --split-tokens 262144

Writes $PICOCHAT_HOME/eval/base_loss_<tag>_step<N>.json.

Which val bpb is which: both this command and the in-training eval read the val shard from
its first token, in rows of the same sequence length, so with `--split-tokens` equal to the
training run's `--eval-tokens` (the cpu speedrun passes it), both a whole number of batches, and
as many processes, they score the very same tokens and the last in-training eval equals this val
bpb. The JSON records the tokens the training eval scored, its process count and its last value
next to ours, and the standard error of each split's bpb across its
batches (a ratio estimate: batch i has bpb b_i over B_i bytes), so a difference can be read
against the noise. Consecutive batches can come from one document, so the standard error is
a lower bound on the true sampling error.
"""

from __future__ import annotations

import argparse
import math

import torch

from picochat.checkpoint import find_checkpoint, load_checkpoint_dir
from picochat.config import add_checkpoint_arguments, add_device_arguments
from picochat.data.loader import PackedLoader
from picochat.data.shards import default_data_dir, list_shards
from picochat.errors import ConfigError
from picochat.eval.bpb import evaluate_bpb_with_se
from picochat.eval.samples import sample_prompts
from picochat.fileio import write_json
from picochat.runtime import home, init_distributed, log0, pick_dtype, shutdown_distributed


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(p, "base", choose_stage=False)
    p.add_argument("--split-tokens", type=int, default=393216,
                   help="tokens evaluated per split (train and val); give the training run's --eval-tokens "
                        "to score the very tokens its eval scored")
    p.add_argument("--train-tokens", type=int, default=None,
                   help="tokens of the train split, when it should differ from --split-tokens")
    p.add_argument("--device-batch-size", type=int, default=None, help="sequences per batch (default: 8)")
    p.add_argument("--data-dir", default=None, help="shard directory (default $PICOCHAT_HOME/data/builtin)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens per greedy sample")
    add_device_arguments(p)


def run(args: argparse.Namespace) -> int:
    world = init_distributed(args.device)
    try:
        dtype = pick_dtype(world.device, args.dtype)
        path = find_checkpoint("base", args.tag, args.step)
        model, tokenizer, meta = load_checkpoint_dir(path, world.device)
        T = model.config.sequence_len
        B = args.device_batch_size or 8
        per_batch = B * T * world.world_size
        steps = {"val": args.split_tokens // per_batch,
                 "train": (args.split_tokens if args.train_tokens is None else args.train_tokens) // per_batch}
        for split, flag in (("val", "--split-tokens"), ("train", "--train-tokens")):
            if steps[split] < 1:
                raise ConfigError(f"{flag} gives the {split} split less than one batch ({B}*{T}*{world.world_size} "
                                  "tokens); raise it")
        train_files, val_file = list_shards(args.data_dir or default_data_dir())
        token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.long, device=world.device)
        results: dict = {"checkpoint": str(path), "step": meta["step"], "tokens_per_split": steps["val"] * per_batch,
                         "train_tokens": steps["train"] * per_batch, "batches_per_split": steps["val"],
                         "world_size": world.world_size, **training_eval(meta)}
        for split, files in (("train", train_files), ("val", [val_file])):
            loader = PackedLoader(files, tokenizer, B, T, world.rank, world.world_size, world.device)
            results[f"{split}_bpb"], results[f"{split}_bpb_se"] = evaluate_bpb_with_se(
                model, loader, steps[split], token_bytes, dtype)
            loader.close()
            log0(f"{split} bpb: {results[f'{split}_bpb']:.4f} ± {results[f'{split}_bpb_se']:.4f} (standard error "
                 f"over {steps[split]} batches)")
        if same_tokens_as_training(results):
            log0(f"val: the same {results['tokens_per_split']:,} tokens as the in-training eval "
                 f"(its last value: {results.get('training_eval_val_bpb')})")
        if world.is_main:
            results["samples"] = sample_prompts(model, tokenizer, max_new_tokens=args.max_new_tokens, compute_dtype=dtype)
            for s in results["samples"]:
                log0(f"{s['prompt']}{s['completion']!r}")
            out = home() / "eval" / f"base_loss_{meta.get('tag', path.parent.name)}_step{meta['step']}.json"
            write_json(out, results, indent=1)
            log0(f"wrote {out}")
        return 0
    finally:
        shutdown_distributed()


def training_eval(meta: dict) -> dict:
    """The in-training eval of the checkpoint, where recorded: the val tokens it scored (the whole
    batches of its --eval-tokens), its number of processes, and its last val bpb."""
    out = {}
    args = meta.get("args") or {}
    tokens, world = args.get("eval_tokens"), meta.get("world_size", 1)
    sizes = (args.get("device_batch_size"), args.get("max_seq_len"), world)
    if isinstance(tokens, int) and all(isinstance(n, int) and n > 0 for n in sizes):
        per_batch = math.prod(sizes)
        out["training_eval_tokens"] = tokens // per_batch * per_batch
        out["training_eval_world_size"] = world
    bpb = (meta.get("metrics") or {}).get("val_bpb")
    if isinstance(bpb, (int, float)):
        out["training_eval_val_bpb"] = bpb
    return out


def same_tokens_as_training(results: dict) -> bool:
    """Whether a base-loss result's val split is the very text the in-training eval scored: as many
    tokens, read by as many processes (rank r reads documents r, r + world, ...)."""
    return (results.get("training_eval_tokens") is not None
            and results.get("training_eval_tokens") == results.get("tokens_per_split")
            and results.get("training_eval_world_size", 1) == results.get("world_size", 1))
