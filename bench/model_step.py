"""Micro-benchmark: one full training step (forward + backward + optimiser) of the GPT.

    python bench/model_step.py --depth 4 --vocab 32768 --seq 256 --batch 32 --dtype fp32 bf16
    python bench/model_step.py --vocab 8192 --batch 8 --arch classic smear all_2026   # architecture options

Prints the machine (CPU kind and flags, threads, the dtype `auto` picks), a table (tok/s per
variant, split into forward+backward and optimiser time) and one JSON line with the same numbers,
also written to --out (default $PICOCHAT_HOME/bench/model_step-<time>.json). Defaults are the `cpu`
preset's model shape.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from picochat.model import GPTConfig, build_model
from picochat.model.gpt import ARCH_2026, compiled_for_training
from picochat.optim import build_optimizers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# --arch: the architecture options one at a time (GPTConfig fields), and all of them (the 2026 recipe's model)
ARCHS = {"classic": {}, "value_embeds": {"value_embeds": True}, "layer_lambdas": {"layer_lambdas": True},
         "smear": {"smear": True}, "backout": {"backout": True}, "windows": {"window_pattern": "SSSL"},
         "qk_scale": {"qk_scale": 1.2}, "all_2026": ARCH_2026}


def bench_variant(config: GPTConfig, batch: int, dtype: torch.dtype, compile_model: bool, steps: int,
                  warmup: int, plain_loss: bool = False) -> dict:
    torch.manual_seed(0)
    model = build_model(config, "cpu")
    optimizers = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004)
    step_model = compiled_for_training(model, dynamic=False) if compile_model else model
    idx = torch.randint(0, config.vocab_size, (batch, config.sequence_len))
    targets = torch.roll(idx, -1, dims=1)
    t_fwd_bwd = t_opt = cpu = 0.0
    losses = []
    t_start, warmup_s = time.perf_counter(), 0.0
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            if plain_loss:  # the per-token path: full (B, T, vocab) logits, autograd through them
                loss = step_model(idx, targets, loss_reduction="none").mean()
            else:
                loss = step_model(idx, targets)
        loss.backward()
        t1 = time.perf_counter()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        t2, c2 = time.perf_counter(), time.process_time()
        losses.append(loss.item())
        if i == warmup - 1:
            warmup_s = time.perf_counter() - t_start
        if i >= warmup:
            t_fwd_bwd += t1 - t0
            t_opt += t2 - t1
            cpu += c2 - c0
    tokens = steps * batch * config.sequence_len
    total = t_fwd_bwd + t_opt
    return {"dtype": str(dtype).removeprefix("torch."), "compile": compile_model, "plain_loss": plain_loss,
            "tok_per_s": tokens / total, "step_s": total / steps, "fwd_bwd_s": t_fwd_bwd / steps,
            "optim_s": t_opt / steps, "cpu_s": cpu / steps, "warmup_s": warmup_s, "gflops": model.flops_per_token() * tokens / total / 1e9,
            "losses": [round(x, 4) for x in losses]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--aspect-ratio", type=int, default=64)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd variants")
    parser.add_argument("--plain-loss", action="store_true",
                        help="also time the loss through materialised logits instead of the chunked fused one")
    parser.add_argument("--arch", nargs="+", choices=list(ARCHS), default=["classic"],
                        help="architecture options to time, each alone, or all_2026 for all of them")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results file (default: $PICOCHAT_HOME/bench/model_step-<time>.json)")
    args = parser.parse_args()
    for flag in ("depth", "aspect_ratio", "head_dim", "vocab", "seq", "batch", "threads", "steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    from machine import describe_machine, format_machine
    from results import default_out, write_results

    torch.set_num_threads(args.threads)
    machine = describe_machine(torch.device("cpu"))
    print(format_machine(machine), flush=True)
    results = []
    for arch in args.arch:
        config = GPTConfig.from_depth(args.depth, args.vocab, aspect_ratio=args.aspect_ratio,
                                      head_dim=args.head_dim, max_seq_len=args.seq, **ARCHS[arch])
        for name in args.dtype:
            for compile_model in ([False, True] if args.compile else [False]):
                for plain in ([False, True] if args.plain_loss and not compile_model else [False]):
                    results.append({"arch": arch, "config": config.to_dict(),
                                    **bench_variant(config, args.batch, DTYPES[name], compile_model, args.steps,
                                                    args.warmup, plain)})
    # cpu s: process CPU time per step (all threads); on a busy machine wall time inflates, this less so.
    print(f"{'arch':>13} {'dtype':>8} {'compile':>7} {'loss':>7} {'tok/s':>8} {'step s':>7} {'fwd+bwd':>8} "
          f"{'fb tok/s':>8} {'optim':>7} {'cpu s':>7} {'GFLOP/s':>8}")
    for r in results:
        loss_kind = "plain" if r["plain_loss"] else "fused"
        fwd_bwd_tok_s = args.batch * args.seq / r["fwd_bwd_s"]
        print(f"{r['arch']:>13} {r['dtype']:>8} {r['compile']!s:>7} {loss_kind:>7} {r['tok_per_s']:8.0f} "
              f"{r['step_s']:7.2f} {r['fwd_bwd_s']:8.2f} {fwd_bwd_tok_s:8.0f} {r['optim_s']:7.3f} {r['cpu_s']:7.2f} "
              f"{r['gflops']:8.1f}")
    summary = {"machine": machine, "batch": args.batch, "threads": args.threads, "results": results}
    print(json.dumps(summary))
    return 0 if write_results(args.out or default_out("model_step"), summary) else 1


if __name__ == "__main__":
    sys.exit(main())
