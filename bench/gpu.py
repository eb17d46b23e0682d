"""GPU validation on one CUDA device, in a few minutes: is the GPU path as fast and as small as planned?

    python bench/gpu.py                      # depths 12 and 20, batch from the plan, 3 + 5 steps each
    python bench/gpu.py --depths 12 --steps 3
    python bench/gpu.py --depths 12 --recipes 2025 2026 --fp8   # the 2026 bundle, in bf16 and in fp8

For each depth and recipe (`--recipes`: 2025, the classic model and Muon; 2026, the newest
architecture and Muon rule as `base-train --recipe 2026` builds them; with `--fp8` every row
runs a second time with the block matmuls in float8, as `base-train --fp8 on` trains):
the compiled bf16 training step (AdamW + Muon, random tokens, T=2048,
vocab 65,536) with its MFU against the device's dense bf16 peak, and its peak memory
(torch.cuda.max_memory_allocated) against `picochat plan`'s estimate for the same shape;
then greedy decoding of one sequence with a KV cache against the HBM roofline (every token
reads every bf16 weight but the embedding tables once), and the time to save and load a full
training checkpoint (weights, tokenizer, optimiser state) through picochat.checkpoint.

The device batch is the largest of 1, 2, 4, ..., 32 that the plan says fits this device
(one process, so the optimiser state is not sharded), unless --batch is given.
Prints a table and one JSON line, also written to --out (default
$PICOCHAT_HOME/bench/gpu-<time>.json); after each row the rows so far are written there with
`"partial": true`, which the complete file at the end does not have. Without a CUDA device it
says so in one line and exits 2.

`--device cpu` runs the same code on this machine's CPU, at the sizes you give it
(`--seq-len`, `--vocab`, `--dtype`): a check that every part of the run works before a GPU's
time is spent on it, not a measurement of a GPU. On a CPU the peak memory is the process's peak
resident set (an upper bound on tensor memory), the MFU is against the CPU's measured matmul peak,
and the decode roofline is "-" (no bandwidth entry for a CPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from results import default_out, write_results

from picochat.mfu import lookup_device, use_expandable_segments

VOCAB, SEQ_LEN = 65536, 2048
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; a CPU is done when the call returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def capacity_bytes(device: torch.device) -> int:
    """Memory the plan may fill: the GPU's, or this machine's RAM for --device cpu."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from machine import describe_machine

    return f"CPU {describe_machine(device)['cpu_model']}"


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast for the matmuls; fp32 runs as it is."""
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()


def pick_batch(config, capacity: int, cap: int, compiled: bool = True) -> int:
    from picochat.plan import Shape, largest_batch

    shape = Shape.from_config(config, 1, compiled=compiled, total_batch_tokens=1)  # one micro-batch per step
    return largest_batch(shape, capacity, [b for b in (1, 2, 4, 8, 16, 32) if b <= cap])


def recipe_parts(recipe: str) -> tuple[dict, object]:
    """(GPTConfig architecture keywords, MuonOptions) of a --recipe, as base-train resolves them."""
    from picochat.config import ARCHITECTURE_FIELDS
    from picochat.train.base_train import BaseTrainConfig, muon_options_for

    cfg = BaseTrainConfig.defaults(recipe=recipe)
    return {k: getattr(cfg, k) for k in ARCHITECTURE_FIELDS if getattr(cfg, k) is not None}, muon_options_for(cfg)


def train_row(depth: int, recipe: str, fp8: bool, batch: int | None, warmup: int, steps: int,
              device: torch.device, size: argparse.Namespace) -> tuple[dict, object]:
    """Compiled bf16 (or fp8) training steps at one depth and recipe: tok/s, MFU, peak memory against the plan.

    `size` holds the run's seq_len, vocab, dtype name and compile flag (the GPU defaults, or --device cpu's).
    """
    from picochat.mfu import mfu_percent, peak_flops, peak_memory_bytes
    from picochat.model.fp8 import convert_to_fp8
    from picochat.model.gpt import GPTConfig, build_model
    from picochat.optim import build_optimizers
    from picochat.plan import Shape, memory_terms

    arch, muon = recipe_parts(recipe)
    T, dtype = size.seq_len, DTYPES[size.dtype]
    config = GPTConfig.from_depth(depth, size.vocab, max_seq_len=T, **arch)
    B = batch or pick_batch(config, capacity_bytes(device), 32, size.compile)
    head = {"depth": depth, "recipe": recipe, "fp8": fp8}
    if B < 1:
        return {**head, "error": "the plan says no batch fits this device"}, None
    torch.manual_seed(0)
    model = build_model(config, device)
    if fp8:
        convert_to_fp8(model)
    optimizers = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, muon_options=muon)
    compiled = torch.compile(model, dynamic=False) if size.compile else model
    x = torch.randint(0, size.vocab, (B, T), device=device)
    y = torch.randint(0, size.vocab, (B, T), device=device)

    def step() -> torch.Tensor:
        with autocast(device, dtype):
            loss = compiled(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    t0 = time.time()
    for _ in range(warmup):  # compilation happens here
        step()
    sync(device)
    compile_s = time.time() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.time()
    for _ in range(steps):
        loss = step()
    sync(device)
    dt = (time.time() - t0) / steps
    tok_s = B * T / dt
    shape = Shape.from_config(config, B, compiled=size.compile, total_batch_tokens=B * T)
    planned = sum(memory_terms(shape).values())
    peak = peak_memory_bytes(device)
    row = {**head, "params": model.num_params(), "batch": B, "compile_s": round(compile_s, 1),
           "step_ms": round(1000 * dt, 1), "tok_per_s": round(tok_s),
           "mfu": mfu_percent(model.flops_per_token(), tok_s, peak_flops(device, dtype), 1),
           "peak_mem_gib": peak / 2**30, "plan_mem_gib": planned / 2**30, "mem_vs_plan": peak / planned,
           "loss": float(loss)}
    return row, (model, optimizers)  # the compiled graph and the batch are freed here


# Memory bandwidth by device name, most specific first (same word matching as the peak table).
HBM_BYTES_PER_S: list[tuple[tuple[str, ...], float]] = [
    (("H100", "PCIe"), 2.0e12), (("H100", "NVL"), 3.9e12), (("H100",), 3.35e12), (("H200",), 4.8e12),
    (("A100", "40GB"), 1.555e12), (("A100",), 2.039e12), (("L4",), 0.3e12), (("RTX", "4090"), 1.008e12),
]


def hbm_bandwidth(name: str) -> float:
    """Bytes/s of the device's memory, NaN when the table has no entry."""
    return lookup_device(name, HBM_BYTES_PER_S)


@torch.no_grad()
def decode_row(model, device: torch.device, dtype: torch.dtype = torch.bfloat16, prompt: int = 128,
               new: int = 128) -> dict:
    """Greedy decoding of one sequence with weights in `dtype` and a KV cache; tok/s against the HBM roofline."""
    from picochat.model.kv_cache import KVCache

    c = model.config
    prompt = min(prompt, c.sequence_len // 2)
    new = min(new, c.sequence_len - prompt - 1)
    m = copy.deepcopy(model).to(dtype).eval()
    cache = KVCache(1, c.n_layer, c.n_kv_head, c.head_dim, prompt + new + 1, device=device, dtype=dtype)
    ids = torch.randint(0, c.vocab_size, (1, prompt), device=device)
    with autocast(device, dtype):  # the norms return fp32; matmuls stay in dtype
        tok = m(ids, kv_cache=cache)[:, -1].argmax(-1, keepdim=True)  # prefill
        sync(device)
        t0 = time.time()
        for _ in range(new):
            tok = m(tok, kv_cache=cache)[:, -1].argmax(-1, keepdim=True)
        sync(device)
    tok_s = new / (time.time() - t0)
    lookups = sum(e.weight.numel() for e in model.modules() if isinstance(e, torch.nn.Embedding))
    weight_bytes = dtype.itemsize * (model.num_params() - lookups)  # every weight but the embedding tables
    bandwidth = hbm_bandwidth(torch.cuda.get_device_name(device)) if device.type == "cuda" else float("nan")
    roofline = bandwidth / weight_bytes
    del m, cache
    return {"decode_tok_per_s": round(tok_s, 1), "decode_roofline_tok_per_s": round(roofline, 1),
            "decode_vs_roofline": tok_s / roofline}


def checkpoint_row(model, optimizers, directory: Path, device: torch.device) -> dict:
    """Seconds to save and to load one full training checkpoint through picochat.checkpoint."""
    from picochat import checkpoint as ckpt
    from picochat.tokenizer import Tokenizer

    tokenizer = Tokenizer({bytes([b]): b for b in range(256)})  # bytes only: no trainer needed (a GPU image may lack one)
    state = {"optimizers": [o.state_dict() for o in optimizers]}
    sync(device)
    t0 = time.time()
    path = ckpt.save_checkpoint(directory, 1, model, tokenizer, {"stage": "bench"}, state)
    save_s = time.time() - t0
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    t0 = time.time()
    ckpt.load_checkpoint_dir(path, device)
    ckpt.load_training_state(path)
    sync(device)
    load_s = time.time() - t0
    shutil.rmtree(directory, ignore_errors=True)
    return {"ckpt_gb": size / 1e9, "save_s": round(save_s, 2), "load_s": round(load_s, 2)}


def fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:,.2f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def results(name: str, args: argparse.Namespace, rows: list[dict], seconds: float) -> dict:
    """The JSON record: the device, the sizes, and every row (NaN as null)."""
    return {"device": name, "torch": torch.__version__, "dtype": args.dtype, "seq_len": args.seq_len,
            "vocab": args.vocab, "compiled": args.compile, "seconds": seconds,
            "rows": [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", type=int, nargs="+", default=[12, 20], help="model depths (default 12 20)")
    p.add_argument("--recipes", nargs="+", choices=("2025", "2026"), default=["2025"],
                   help="model and Muon rule of each row (default 2025)")
    p.add_argument("--fp8", action="store_true", help="also time every row with the block matmuls in float8 "
                   "(needs FP8 tensor cores: compute capability 8.9+)")
    p.add_argument("--batch", type=int, default=None, help="device batch (default: the largest the plan fits)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps, compilation included (default 3)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    p.add_argument("--out", default=None, help="JSON output (default $PICOCHAT_HOME/bench/gpu-<time>.json)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: run the same code on this CPU to check it works, not to measure a GPU (default cuda)")
    size = p.add_argument_group("sizes (the GPU run's defaults; smaller ones for --device cpu)")
    size.add_argument("--seq-len", type=int, default=SEQ_LEN, help=f"tokens per row (default {SEQ_LEN})")
    size.add_argument("--vocab", type=int, default=VOCAB, help=f"vocabulary (default {VOCAB:,})")
    size.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="compute dtype (default bf16)")
    size.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                      help="torch.compile the training step (default on)")
    args = p.parse_args()
    for flag in ("steps", "seq_len", "vocab", "batch"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    use_expandable_segments()  # before CUDA is initialised, as the training commands do
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device on this machine; run it where torch.cuda.is_available() is True "
              "(or check the code path on this CPU with --device cpu and small sizes)", file=sys.stderr)
        return 2
    from picochat.runtime import home

    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    name = device_name(device)
    out = Path(args.out) if args.out else default_out("gpu")
    t_all = time.time()
    rows = []
    if args.fp8 and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        print("bench/gpu.py: --fp8 needs FP8 tensor cores (compute capability 8.9+); this GPU has "
              f"{torch.cuda.get_device_capability(device)}", file=sys.stderr)
        return 2
    for depth in args.depths:
        for recipe in args.recipes:
            for fp8 in (False, True) if args.fp8 else (False,):
                row, parts = train_row(depth, recipe, fp8, args.batch, args.warmup, args.steps, device, args)
                if parts is not None and not fp8:  # decode and checkpoints do not depend on fp8
                    model, optimizers = parts
                    row.update(decode_row(model, device, DTYPES[args.dtype]))
                    row.update(checkpoint_row(model, optimizers, home() / "bench" / f".gpu-ckpt-{depth}", device))
                    del model, optimizers
                del parts
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rows.append(row)
                result = {**results(name, args, rows, time.time() - t_all), "partial": True}
                if not write_results(out, result, announce=False):  # the rows so far, in case a time limit stops the run
                    return 1
                print(f"depth {depth} recipe {recipe}{' fp8' if fp8 else ''} done after {time.time() - t_all:.0f}s "
                      f"({len(rows)} rows in {out})", flush=True)
    cols = ["depth", "recipe", "fp8", "batch", "compile_s", "step_ms", "tok_per_s", "mfu", "peak_mem_gib", "plan_mem_gib",
            "mem_vs_plan", "decode_tok_per_s", "decode_roofline_tok_per_s", "decode_vs_roofline", "save_s", "load_s"]
    print(f"\n{name}, torch {torch.__version__}, {args.dtype}, T={args.seq_len}, vocab {args.vocab:,}, "
          f"{'compiled' if args.compile else 'eager'}, {time.time() - t_all:.0f}s in all")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(fmt(r.get(c, "-")) for c in cols))
    result = results(name, args, rows, time.time() - t_all)
    written = write_results(out, result)
    print(json.dumps(result))  # the last line, as every benchmark ends
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
