"""`picochat base-loss`: train/val bits-per-byte of a base checkpoint, plus greedy samples.

    picochat base-loss                      # newest base checkpoint
    picochat base-loss --tag d4 --step 1500 --split-tokens 262144

Writes $PICOCHAT_HOME/eval/base_loss_<tag>_step<N>.json.
"""

from __future__ import annotations

import argparse
import json

import torch

from picochat.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tag", default=None, help="base run tag (default: the newest)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--split-tokens", type=int, default=262144, help="tokens evaluated per split (train and val)")
    p.add_argument("--device-batch-size", type=int, default=None, help="sequences per batch (default: 8)")
    p.add_argument("--data-dir", default=None, help="shard directory (default $PICOCHAT_HOME/data/builtin)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens per greedy sample")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto, bf16, fp32")


def run(args: argparse.Namespace) -> int:
    from picochat.data.loader import PackedLoader
    from picochat.data.shards import default_data_dir, list_shards
    from picochat.eval.bpb import evaluate_bpb
    from picochat.eval.samples import sample_prompts
    from picochat.runtime import home, init_distributed, log0, pick_dtype, shutdown_distributed
    from picochat.train.checkpoint import find_checkpoint, load_checkpoint_dir

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
        results: dict = {"checkpoint": str(path), "step": meta["step"], "tokens_per_split": steps * B * T * world.world_size}
        for split, files in (("train", train_files), ("val", [val_file])):
            loader = PackedLoader(files, tokenizer, B, T, world.rank, world.world_size, world.device)
            results[f"{split}_bpb"] = evaluate_bpb(model, loader, steps, token_bytes, dtype)
            loader.close()
            log0(f"{split} bpb: {results[f'{split}_bpb']:.4f}")
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
