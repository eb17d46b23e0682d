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

import torch

from picochat.checkpoint import find_checkpoint, load_checkpoint_dir
from picochat.config import add_checkpoint_arguments, add_device_arguments
from picochat.data.loader import PackedLoader
from picochat.data.shards import default_data_dir, list_shards
from picochat.errors import ConfigError
from picochat.eval.bpb import evaluate_bpb_with_se
from picochat.eval.samples import sample_prompts
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
                         **training_eval(meta)}
        for split, files in (("train", train_files), ("val", [val_file])):
            loader = PackedLoader(files, tokenizer, B, T, world.rank, world.world_size, world.device)
            results[f"{split}_bpb"], results[f"{split}_bpb_se"] = evaluate_bpb_with_se(
                model, loader, steps[split], token_bytes, dtype)
            loader.close()
            log0(f"{split} bpb: {results[f'{split}_bpb']:.4f} ± {results[f'{split}_bpb_se']:.4f} (standard error "
                 f"over {steps[split]} batches)")
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
