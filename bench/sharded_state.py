"""Sharded optimiser state: bytes per rank, step time against the all-reduce path, GPU arithmetic.

    python bench/sharded_state.py                      # depth 4, worlds 1 2 4, timing at 2 ranks
    python bench/sharded_state.py --depth 6 --steps 10 --time-world 2

Three tables, then one JSON line with every number:
1. optimiser-state bytes held by each rank (measured: the numel of every state tensor) at each
   world size, for a small model trained a few steps with sharded state (gloo, 127.0.0.1);
2. mean step time (and its parts) at `--time-world` gloo ranks, one torch thread each, best of
   `--rounds` alternating rounds: the unsharded path
   (all-reduce of every gradient, full optimisers on every rank) against the sharded one
   (fp32 and bf16 reductions);
3. fixed memory per GPU for the d20 / d26 / d32 presets at 8 ranks from parameter counts:
   fp32 weights + fp32 gradients + optimiser state (+ the all-reduce path's copy of every
   gradient), before and after sharding.
The machine (CPU kind and flags) comes first; the JSON line is also written to --out (default
$PICOCHAT_HOME/bench/sharded_state-<time>.json).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from picochat.model.gpt import GPT, GPTConfig, build_model
from picochat.optim import assign_param_groups, build_optimizers, sync_gradients
from picochat.optim.sharded import LocalGradients, assign_owners, shard_optimizers


class AllReducedGradients(LocalGradients):
    """The unsharded path: all-reduce every gradient after the last backward."""

    def wait(self) -> None:
        sync_gradients(self.model)


def slowest(records: list[dict]) -> float:
    return max(r["step_s"] for r in records)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def state_bytes(optimizers) -> int:
    return sum(v.numel() * v.element_size() for opt in optimizers for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v) and v.ndim > 0)


def worker(rank: int, world: int, port: int, args: argparse.Namespace, mode: str, out: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    config = GPTConfig.from_depth(args.depth, args.vocab, aspect_ratio=64, head_dim=64, max_seq_len=args.seq)
    model = build_model(config, "cpu")
    with contextlib.redirect_stdout(io.StringIO()):  # the optimiser group printout, once per run
        optimizers = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004)
    if mode == "unsharded":
        gradients = AllReducedGradients(model)
    else:
        gradients, optimizers = shard_optimizers(model, optimizers, rank, world, "bf16" if mode == "bf16" else "fp32")
    g = torch.Generator().manual_seed(rank)
    times: dict[str, list[float]] = {"step_s": [], "backward_s": [], "wait_s": [], "optim_s": []}
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        for i in range(args.accum):
            x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
            if i == args.accum - 1:
                gradients.arm()
            (model(x, torch.roll(x, -1, 1)) / args.accum).backward()
        t1 = time.perf_counter()
        gradients.wait()
        t2 = time.perf_counter()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if world > 1:
            dist.barrier()
        if step >= args.warmup:
            for key, value in zip(times, (time.perf_counter() - t0, t1 - t0, t2 - t1, t3 - t2)):
                times[key].append(value)
    record = {"rank": rank, "state_bytes": state_bytes(optimizers),
              **{key: statistics.mean(values) for key, values in times.items()}}
    Path(out, f"{mode}_w{world}_r{rank}.json").write_text(json.dumps(record))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def run(world: int, args: argparse.Namespace, mode: str, out: str) -> list[dict]:
    mp.start_processes(worker, args=(world, free_port(), args, mode, out), nprocs=world, start_method="spawn")
    return [json.loads(Path(out, f"{mode}_w{world}_r{r}.json").read_text()) for r in range(world)]


def gpu_arithmetic(world: int = 8) -> list[dict]:
    """Fixed bytes per GPU for the GPU presets, from parameter counts (no allocation)."""
    rows = []
    for depth in (20, 26, 32):
        config = GPTConfig.from_depth(depth, 65536, aspect_ratio=64, head_dim=128, max_seq_len=2048)
        with torch.device("meta"):
            model = GPT(config)
        groups = assign_param_groups(model)
        matrices = [p.numel() for _, p in groups["matrix"]]
        adamw = sum(p.numel() for key in ("embedding", "unembedding") for _, p in groups[key])
        n = sum(matrices) + adamw
        owners = assign_owners(matrices, world)
        muon_most = max(sum(m for m, o in zip(matrices, owners) if o == r) for r in range(world))
        full_state = 8 * adamw + 4 * sum(matrices)  # AdamW: exp_avg + exp_avg_sq; Muon: momentum
        shard_state = 8 * -(-adamw // world) + 4 * muon_most
        rows.append({"preset": f"d{depth}", "params": n, "weights_gb": 4 * n / 1e9, "grads_gb": 4 * n / 1e9,
                     "state_before_gb": full_state / 1e9, "state_after_gb": shard_state / 1e9,
                     "allreduce_copy_gb": 4 * n / 1e9,
                     "before_gb": (8 * n + full_state) / 1e9, "before_with_copy_gb": (12 * n + full_state) / 1e9,
                     "after_gb": (8 * n + shard_state) / 1e9})
    return rows


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=4, help="model depth (width = 64 * depth)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size")
    p.add_argument("--seq", type=int, default=128, help="sequence length")
    p.add_argument("--batch", type=int, default=4, help="sequences per micro-batch per rank")
    p.add_argument("--accum", type=int, default=2, help="micro-batches per step per rank")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4], help="world sizes for the state table")
    p.add_argument("--time-world", type=int, default=2, help="world size of the timing comparison")
    p.add_argument("--steps", type=int, default=6, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=2, help="timing rounds (modes alternate; each keeps its best)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON results file (default: $PICOCHAT_HOME/bench/sharded_state-<time>.json)")
    args = p.parse_args()
    for flag in ("depth", "vocab", "seq", "batch", "accum", "time_world", "steps", "rounds"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if min(args.worlds) < 1:
        p.error("--worlds must be at least 1 each")
    if args.warmup < 0:
        p.error("--warmup must be 0 or more")

    from machine import describe_machine, format_machine
    from results import default_out, write_results

    machine = describe_machine(torch.device("cpu"))
    print(format_machine(machine), flush=True)
    result: dict = {"machine": machine, "cpu": cpu_name(), "load_avg": os.getloadavg(),
                    "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as out:
        state = {w: run(w, argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 0}), "sharded", out)
                 for w in args.worlds}
        timing: dict[str, list[dict]] = {}
        for _ in range(args.rounds):  # modes take turns; each keeps its fastest round (a busy spell hits all)
            for mode in ("unsharded", "sharded", "bf16"):
                records = run(args.time_world, args, mode, out)
                if mode not in timing or slowest(records) < slowest(timing[mode]):
                    timing[mode] = records
    print(f"optimiser state per rank (depth {args.depth}, vocab {args.vocab}), MB")
    print(f"{'world':>5} | {'per rank':<40} | {'total':>8}")
    for w, records in state.items():
        per = [r["state_bytes"] / 1e6 for r in records]
        print(f"{w:>5} | {' '.join(f'{x:.2f}' for x in per):<40} | {sum(per):8.2f}")
    print(f"\nmean step time at {args.time_world} gloo ranks ({cpu_name()}, 1 thread per rank), slowest rank, "
          f"best of {args.rounds} rounds, ms")
    print(f"{'mode':>10} | {'step':>8} | {'fwd+bwd':>8} | {'wait':>8} | {'optim':>8}")
    for mode, records in timing.items():
        r = max(records, key=lambda r: r["step_s"])
        print(f"{mode:>10} | {r['step_s'] * 1e3:8.1f} | {r['backward_s'] * 1e3:8.1f} | {r['wait_s'] * 1e3:8.1f} | "
              f"{r['optim_s'] * 1e3:8.1f}")
    arithmetic = gpu_arithmetic()
    print("\nfixed memory per GPU at 8 ranks (fp32 weights + grads + optimiser state), GB")
    print(f"{'preset':>6} | {'params':>7} | {'before':>6} | {'+allreduce copy':>15} | {'after':>6}")
    for row in arithmetic:
        print(f"{row['preset']:>6} | {row['params'] / 1e9:6.2f}B | {row['before_gb']:6.1f} | "
              f"{row['before_with_copy_gb']:15.1f} | {row['after_gb']:6.1f}")
    result.update({"state_bytes": {w: [r["state_bytes"] for r in rs] for w, rs in state.items()},
                   "timing": {m: max(rs, key=lambda r: r["step_s"]) for m, rs in timing.items()},
                   "gpu_arithmetic": arithmetic})
    print(json.dumps(result))
    return 0 if write_results(args.out or default_out("sharded_state"), result) else 1


if __name__ == "__main__":
    sys.exit(main())
