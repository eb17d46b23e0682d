"""Micro-benchmark: Muon's step time per update rule (picochat.optim.MuonOptions).

    nice python bench/muon_options.py --depth 4 --steps 20

Times `Muon.step()` alone over the block matrices of a GPT (depth 4, width 256 by default),
with fixed random gradients, for the classic rule, each option on its own and all together,
in each orthogonalisation dtype; then each part of the step alone on the same matrices (min of
`--part-repeats`), which stays readable when the machine is too busy for whole-step timings. The variants take turns (`--rounds`), so a slow spell of a
shared machine hits them alike; the wall-time min and the process CPU time (all threads; waiting
for a core does not count) are the robust numbers there. Prints the machine (CPU kind and flags,
threads), a table and one JSON line, also written to --out (default
$PICOCHAT_HOME/bench/muon_options-<time>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from picochat.model import GPTConfig, build_model
from picochat.optim import MuonOptions, build_optimizers, newton_schulz, polar_express
from picochat.optim.muon import equilibrate_rows, normuon_rescale, renormalize, second_moment_shape

VARIANTS = {
    "classic": MuonOptions(),
    "polar_express": MuonOptions(orthogonalizer="polar_express"),
    "muon_eq": MuonOptions(row_equilibration=True),
    "muon_plus": MuonOptions(renormalize=True),
    "normuon": MuonOptions(normuon_beta2=0.9),
    "cautious_wd": MuonOptions(cautious_weight_decay=True),
    "all": MuonOptions(orthogonalizer="polar_express", row_equilibration=True, renormalize=True,
                       normuon_beta2=0.9, cautious_weight_decay=True),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_muon(config: GPTConfig, options: MuonOptions, dtype: torch.dtype) -> torch.optim.Optimizer:
    """Muon over a fresh model's block matrices, each with a fixed random gradient."""
    torch.manual_seed(0)
    model = build_model(config, "cpu")
    _, muon = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, weight_decay=0.2,
                               muon_options=options, world=_Quiet())
    muon.ns_dtype = dtype
    for group in muon.param_groups:
        for p in group["params"]:
            p.grad = torch.randn_like(p) * 1e-3
    return muon


def time_steps(muon: torch.optim.Optimizer, steps: int) -> list[tuple[float, float]]:
    """(wall seconds, process CPU seconds) of each of `steps` steps."""
    times = []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        muon.step()
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    return times


def time_parts(muon: torch.optim.Optimizer, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    """Milliseconds of each part of a step, summed over the same-shape stacks (min of `repeats`,
    taken in turns so that a busy spell of the machine does not hit one part's every sample)."""
    stacks = {}
    for p in muon.param_groups[0]["params"]:
        stacks.setdefault(p.shape, []).append(p)
    inputs = [(torch.stack([p.grad for p in ps]), torch.stack([p.detach() for p in ps]),
               [torch.zeros(second_moment_shape(tuple(shape))) for _ in ps]) for shape, ps in stacks.items()]

    def cautious(X: torch.Tensor, P: torch.Tensor) -> None:
        P.mul_(torch.where(X * P >= 0, 1.0 - 1e-9, 1.0))

    parts = {"newton_schulz": lambda X, P, V: newton_schulz(X, 5, dtype),
             "polar_express": lambda X, P, V: polar_express(X, 5, dtype),
             "muon_eq": lambda X, P, V: equilibrate_rows(X), "muon_plus": lambda X, P, V: renormalize(X),
             "normuon": lambda X, P, V: normuon_rescale(X, V, 0.9), "cautious_wd": lambda X, P, V: cautious(X, P)}
    best = {(name, i): float("inf") for name in parts for i in range(len(inputs))}
    for _ in range(repeats):
        for name, part in parts.items():
            for i, (X, P, V) in enumerate(inputs):
                t0 = time.perf_counter()
                part(X, P, V)
                best[name, i] = min(best[name, i], time.perf_counter() - t0)
    return {name: 1000 * sum(best[name, i] for i in range(len(inputs))) for name in parts}


class _Quiet:
    is_main = False  # build_optimizers prints its groups only on the main process


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--aspect-ratio", type=int, default=64)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--part-repeats", type=int, default=10)
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results file (default: $PICOCHAT_HOME/bench/muon_options-<time>.json)")
    args = parser.parse_args()
    for flag in ("depth", "aspect_ratio", "head_dim", "threads", "steps", "rounds", "part_repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    from machine import describe_machine, format_machine
    from results import default_out, write_results

    torch.set_num_threads(args.threads)
    machine = describe_machine(torch.device("cpu"))
    print(format_machine(machine), flush=True)
    # A small vocabulary: the embedding and lm_head are AdamW's, not Muon's.
    config = GPTConfig.from_depth(args.depth, 1024, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim,
                                  max_seq_len=256)
    runs = {(name, dtype): build_muon(config, options, DTYPES[dtype])
            for dtype in args.dtype for name, options in VARIANTS.items()}
    times: dict[tuple[str, str], list[tuple[float, float]]] = {key: [] for key in runs}
    for key, muon in runs.items():
        time_steps(muon, 2)  # warm-up: state allocation, first-call overheads
    for _ in range(args.rounds):
        for key, muon in runs.items():
            times[key] += time_steps(muon, args.steps)
    rows = [{"variant": name, "dtype": dtype, "median_ms": 1000 * statistics.median(w for w, _ in t),
             "min_ms": 1000 * min(w for w, _ in t), "cpu_ms": 1000 * statistics.median(c for _, c in t)}
            for (name, dtype), t in times.items()]
    base = {r["dtype"]: r["cpu_ms"] for r in rows if r["variant"] == "classic"}
    print(f"Muon.step, depth {args.depth}, width {config.n_embd}, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'variant':>14} {'dtype':>5} {'median ms':>10} {'min ms':>8} {'cpu ms':>8} {'cpu vs classic':>14}")
    for r in rows:
        print(f"{r['variant']:>14} {r['dtype']:>5} {r['median_ms']:10.1f} {r['min_ms']:8.1f} {r['cpu_ms']:8.1f} "
              f"{r['cpu_ms'] / base[r['dtype']]:14.2f}")
    parts = {dtype: time_parts(runs[("classic", dtype)], DTYPES[dtype], args.part_repeats) for dtype in args.dtype}
    print(f"parts of a step, ms (min of {args.part_repeats}): " + " | ".join(
        f"{dtype}: " + ", ".join(f"{k} {v:.1f}" for k, v in p.items()) for dtype, p in parts.items()))
    summary = {"machine": machine, "config": config.to_dict(), "threads": args.threads, "results": rows,
               "parts_ms": parts}
    print(json.dumps(summary))
    return 0 if write_results(args.out or default_out("muon_options"), summary) else 1


if __name__ == "__main__":
    sys.exit(main())
