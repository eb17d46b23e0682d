"""Pretraining throughput: picochat against the reference system on the same shapes, plus the loader.

    python bench/train.py --reference-dir ~/src/nanochat      # everything (several minutes on 2 cores)
    python bench/train.py --skip-reference --steps 3          # picochat rows and the loader only
    python bench/train.py --variants pico-bf16 ref-fp32       # a subset of rows

A row times full training steps (forward + backward + every optimiser's step + zero_grad)
of a freshly initialised model on one fixed batch of random tokens, with each system's own
optimisers: picochat's AdamW + Muon (`build_optimizers`) and the reference's `setup_optimizer`.
Shapes: depth 4, width depth * 64 = 256, head_dim 64 (4 heads, no GQA), vocab 32,768,
B=32, T=256; the reference gets the same fields and full attention in every layer
(window pattern "L"). The reference keeps its own architecture extras (value embeddings,
smear, backout), which cost a few percent of its FLOPs.

Every row runs in its own subprocess, one after another, so threads, imports, compile
caches and the reference's compute-dtype environment variable never mix. The first
`--warmup` steps (compilation included) are not timed; tok/s is B*T / median step time.
With --rounds N every row runs N times, the rows taking turns, and reports its best round.
MFU = tok/s * FLOPs per token (each system's own count: 6 per matmul weight + attention)
over the measured peak of a 1024^3 matmul in fp32 and in bf16 on the same threads. With
--device cuda the rows run on the GPU and MFU is against its datasheet dense bf16 peak
(picochat.mfu's table; no fp32 peak).
The loader row is one of picochat's pretraining loaders alone (`--loader`, default the cpu preset's
aligned rows; tokenizing the built-in corpus shards on its background thread) pulling (B, T)
batches with no model.

Threads: both systems get --threads (torch.set_num_threads and OMP_NUM_THREADS). picochat
also runs with the OpenMP wait policy it sets for itself on import (OMP_WAIT_POLICY=PASSIVE,
see picochat/__init__.py); the reference runs with the environment this script was started
with plus --reference-env, so `--reference-env OMP_WAIT_POLICY=PASSIVE` times it with the
same policy. On a machine other processes are loading this policy matters a lot; the load
average at the start of each row is in the table.

Each system's best row is the variant (dtype, eager or compiled) it trains fastest in; the
summary names it, with its MFU against the measured fp32 and, where bf16 has fast matmuls, bf16
peak, and the ratio picochat-best / reference-best.

Prints the machine (CPU model and flags, cores, threads, torch, the dtype `auto` picks), a table,
the best rows and their ratio, then one JSON line, also written to --out (default
$PICOCHAT_HOME/bench/train-<time>.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The environment as the user gave it, before importing picochat (which sets OMP_WAIT_POLICY):
# reference rows run with exactly this, plus --reference-env.
USER_ENV = dict(os.environ)
RESULT_PREFIX = "BENCH_RESULT "
# name -> (system, dtype, compile the model)
VARIANTS = {
    "pico-fp32": ("picochat", "fp32", False),
    "pico-bf16": ("picochat", "bf16", False),
    "pico-fp32-compile": ("picochat", "fp32", True),
    "pico-bf16-compile": ("picochat", "bf16", True),
    "ref-fp32": ("reference", "fp32", False),
    "ref-fp32-compile": ("reference", "fp32", True),
    "ref-bf16": ("reference", "bf16", False),
    "ref-bf16-compile": ("reference", "bf16", True),
}
FAST_BF16_VARIANTS = ["pico-fp32", "pico-bf16", "pico-bf16-compile", "ref-fp32", "ref-fp32-compile",
                      "ref-bf16", "ref-bf16-compile"]
# Without AMX/AVX512-BF16 a bf16 matmul falls back to scalar code (~1 GFLOP/s, 50x below fp32).
FP32_ONLY_VARIANTS = ["pico-fp32", "pico-fp32-compile", "ref-fp32", "ref-fp32-compile"]


# ---- worker side: one measurement per process ----------------------------------------------------

def time_steps(step, warmup: int, steps: int) -> dict:
    """Run `step()` warmup + steps times; returns the per-step seconds and losses."""
    losses, times = [], []
    t_start = time.perf_counter()
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        losses.append(step())  # a Python float: the step has finished when it returns
        times.append(time.perf_counter() - t0)
    return {"warmup_s": sum(times[:warmup]), "step_times": times[warmup:], "losses": losses,
            "total_s": time.perf_counter() - t_start}


def random_batch(vocab_size: int, batch: int, seq_len: int, device: str):
    import torch

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab_size, (batch, seq_len + 1), generator=gen).to(device)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # (B, T) inputs, targets


def picochat_row(spec: dict) -> dict:
    import torch

    from picochat.model.gpt import GPTConfig, build_model, compiled_for_training
    from picochat.optim import build_optimizers

    torch.manual_seed(0)
    config = GPTConfig.from_depth(spec["depth"], spec["vocab"], aspect_ratio=spec["aspect_ratio"],
                                  head_dim=spec["head_dim"], max_seq_len=spec["seq_len"])
    model = build_model(config, spec["device"])
    optimizers = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004)
    train_model = compiled_for_training(model, dynamic=False) if spec["compile"] else model
    dtype = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
    x, y = random_batch(config.vocab_size, spec["batch"], spec["seq_len"], spec["device"])

    def step() -> float:
        with torch.autocast(torch.device(spec["device"]).type, dtype=dtype, enabled=dtype != torch.float32):
            loss = train_model(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        return loss.item()

    return {**time_steps(step, spec["warmup"], spec["steps"]), "flops_per_token": model.flops_per_token(),
            "params": model.num_params()}


def reference_row(spec: dict) -> dict:
    """The reference's GPT and optimiser, imported from --reference-dir (its dtype comes from the env)."""
    import torch

    sys.path.insert(0, spec["reference_dir"])
    from nanochat.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    n_embd = -(-spec["depth"] * spec["aspect_ratio"] // spec["head_dim"]) * spec["head_dim"]
    n_head = n_embd // spec["head_dim"]
    config = GPTConfig(sequence_len=spec["seq_len"], vocab_size=spec["vocab"], n_layer=spec["depth"],
                       n_head=n_head, n_kv_head=n_head, n_embd=n_embd, window_pattern="L")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=spec["device"])
    model.init_weights()
    optimizer = model.setup_optimizer()
    train_model = torch.compile(model, dynamic=False) if spec["compile"] else model
    x, y = random_batch(config.vocab_size, spec["batch"], spec["seq_len"], spec["device"])

    def step() -> float:
        loss = train_model(x, y)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        return loss.item()

    return {**time_steps(step, spec["warmup"], spec["steps"]), "flops_per_token": model.estimate_flops(),
            "params": sum(p.numel() for p in model.parameters())}


def peak_row(spec: dict) -> dict:
    import torch

    from picochat.mfu import gpu_peak_bf16, measure_cpu_peak

    if spec["device"].startswith("cuda"):  # the datasheet's dense bf16 peak; fp32/TF32 is left out
        peak = gpu_peak_bf16(torch.cuda.get_device_name(spec["device"]))
        return {} if math.isnan(peak) else {"bf16": peak}
    # Best of several short runs: on a busy machine a single long run mostly measures the load.
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    return {name: max(measure_cpu_peak(dtypes[name], seconds=0.3) for _ in range(6)) for name in spec["peak_dtypes"]}


def loader_row(spec: dict) -> dict:
    """Tokens/s the `--loader` kind delivers alone; a small tokenizer is trained when none is saved."""
    import torch  # noqa: F401  (the loader returns tensors)

    from picochat.data.loader import make_loader
    from picochat.data.shards import default_data_dir, iter_texts, list_shards
    from picochat.runtime import home
    from picochat.tokenizer import Tokenizer

    data_dir = Path(spec["data_dir"]) if spec["data_dir"] else default_data_dir()
    if not data_dir.is_dir():
        return {"skipped": f"no shards at {data_dir}; run `picochat data prepare` first"}
    train_files, _ = list_shards(data_dir)
    tok_dir = home() / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        tokenizer, tok_note = Tokenizer.load(tok_dir), str(tok_dir)
    else:
        texts = [t for _, docs in iter_texts(train_files[0]) for t in docs][:2000]
        tokenizer, tok_note = Tokenizer.train(texts, 4096), "trained here (vocab 4096)"
    loader = make_loader(spec["loader"], train_files, tokenizer, spec["batch"], spec["seq_len"])
    try:
        t0 = time.perf_counter()
        next(loader)  # starts the background thread, which tokenizes a few units ahead
        first_batch_s = time.perf_counter() - t0
        batches, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < spec["loader_seconds"]:
            next(loader)
            batches += 1
        elapsed = time.perf_counter() - t0
    finally:
        loader.close()
    return {"tok_per_s": batches * spec["batch"] * spec["seq_len"] / elapsed, "batches": batches,
            "seconds": elapsed, "first_batch_s": first_batch_s, "tokenizer": tok_note, "data_dir": str(data_dir)}


def worker_main(spec: dict) -> None:
    if spec["kind"] != "reference":
        import picochat  # noqa: F401  (before torch: it sets the OpenMP wait policy picochat runs with)
    import torch

    torch.set_num_threads(spec["threads"])
    rows = {"picochat": picochat_row, "reference": reference_row, "peak": peak_row, "loader": loader_row}
    result = rows[spec["kind"]](spec)
    result["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "default")
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# ---- driver side ---------------------------------------------------------------------------------

def run_worker(spec: dict, threads: int, env_extra: dict | None = None) -> dict:
    """Run one measurement in a fresh interpreter; returns its result or {'error': ...}."""
    env = {**USER_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **(env_extra or {})}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], check=False, env=env,
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}


def summarise(name: str, result: dict, spec: dict, peaks: dict) -> dict:
    system, dtype, compiled = VARIANTS[name]
    row = {"variant": name, "system": system, "dtype": dtype, "compile": compiled}
    if "error" in result:
        return {**row, "error": result["error"]}
    step_s = statistics.median(result["step_times"])
    tok_s = spec["batch"] * spec["seq_len"] / step_s
    flops = result["flops_per_token"] * tok_s
    return {**row, "tok_per_s": round(tok_s, 1), "step_s": round(step_s, 3),
            "step_s_min": round(min(result["step_times"]), 3), "step_s_max": round(max(result["step_times"]), 3),
            "warmup_s": round(result["warmup_s"], 1), "gflops": round(flops / 1e9, 1),
            "mfu_fp32_peak": round(100 * flops / peaks["fp32"], 1) if "fp32" in peaks else None,
            "mfu_bf16_peak": round(100 * flops / peaks["bf16"], 1) if "bf16" in peaks else None,
            "loss_first": round(result["losses"][0], 3), "loss_last": round(result["losses"][-1], 3),
            "flops_per_token": result["flops_per_token"], "params": result["params"],
            "load_avg_1m": result["load_avg_1m"], "omp_wait_policy": result["omp_wait_policy"]}


def print_table(rows: list[dict]) -> None:
    print(f"{'variant':<19} {'tok/s':>7} {'step s':>7} {'min-max s':>11} {'warmup s':>8} {'GFLOP/s':>7} "
          f"{'MFU fp32':>8} {'MFU bf16':>8} {'loss 0->N':>13} {'load':>5} {'OMP wait':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<19} error: {r['error']}")
            continue
        mfu_fp32, mfu_bf16 = ("-" if r[k] is None else f"{r[k]:.1f}%" for k in ("mfu_fp32_peak", "mfu_bf16_peak"))
        print(f"{r['variant']:<19} {r['tok_per_s']:7.0f} {r['step_s']:7.2f} "
              f"{r['step_s_min']:5.2f}-{r['step_s_max']:<5.2f} {r['warmup_s']:8.1f} {r['gflops']:7.1f} "
              f"{mfu_fp32:>8} {mfu_bf16:>8} "
              f"{r['loss_first']:6.2f}->{r['loss_last']:<6.2f} {r['load_avg_1m']:5.1f} {r['omp_wait_policy']:>8}")


def parse_args() -> argparse.Namespace:
    from picochat.data.loader import LOADERS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="times every row is run, taking turns with the others (its best round is reported)")
    parser.add_argument("--reference-dir", type=Path, default=None,
                        help="a checkout of the reference system (directory holding nanochat/gpt.py)")
    parser.add_argument("--skip-reference", action="store_true", help="picochat rows only")
    parser.add_argument("--device", default=None, help="auto (default: cuda if present, else cpu) | cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--aspect-ratio", type=int, default=64)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=None,
                        help="rows to run (default: bf16 rows only on CPUs with fast bf16 matmuls)")
    parser.add_argument("--data-dir", type=Path, default=None, help="loader shards (default: the built-in corpus)")
    parser.add_argument("--loader-seconds", type=float, default=10.0)
    parser.add_argument("--skip-loader", action="store_true")
    parser.add_argument("--loader", choices=LOADERS, default="aligned",
                        help="the loader kind the loader row reads with (default: the cpu preset's)")
    parser.add_argument("--reference-env", nargs="+", default=[], metavar="KEY=VALUE",
                        help="extra environment for the reference rows, e.g. OMP_WAIT_POLICY=PASSIVE")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results file (default: $PICOCHAT_HOME/bench/train-<time>.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for flag in ("steps", "rounds", "threads", "depth", "aspect_ratio", "head_dim", "vocab", "seq_len", "batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    if args.loader_seconds <= 0:
        parser.error("--loader-seconds must be positive (--skip-loader leaves the loader out)")
    bad = [item for item in args.reference_env if "=" not in item]
    if bad:
        parser.error(f"--reference-env {bad[0]!r}: give KEY=VALUE")
    return args


def choose_variants(args, fast_bf16: bool) -> tuple[list[str], list[str]]:
    """(rows to run, notes on what was left out and why)."""
    notes = []
    variants = args.variants
    if variants is None:
        variants = FAST_BF16_VARIANTS if fast_bf16 else FP32_ONLY_VARIANTS
        if not fast_bf16:
            notes.append("bf16 rows skipped: this CPU has no AMX/AVX512-BF16, where bf16 matmuls run ~50x slower "
                         "than fp32 (name them in --variants to time them anyway)")
    skip_reference = args.skip_reference
    if not skip_reference and args.reference_dir is None:
        notes.append("reference rows skipped: no --reference-dir given")
        skip_reference = True
    elif not skip_reference and not (args.reference_dir / "nanochat" / "gpt.py").exists():
        notes.append(f"reference rows skipped: {args.reference_dir}/nanochat/gpt.py does not exist")
        skip_reference = True
    if skip_reference:
        variants = [v for v in variants if VARIANTS[v][0] != "reference"]
    return variants, notes


def run_rounds(variants: list[str], spec: dict, peaks: dict, args, on_row=None) -> list[dict]:
    """Every variant once per round, in turn, so a slow spell of the machine (other tenants, clock
    changes) is spread over all of them; each variant keeps its best round. `on_row(rows)` gets the
    best rows so far after each run (to save them as they come)."""
    reference_env = dict(item.split("=", 1) for item in args.reference_env)
    best_rows: dict[str, dict] = {}
    for round_index in range(args.rounds):
        for name in variants:
            system, dtype, compiled = VARIANTS[name]
            row_spec = {**spec, "kind": system, "dtype": dtype, "compile": compiled,
                        "reference_dir": str(args.reference_dir.resolve()) if args.reference_dir else None}
            env = None
            if system == "reference":  # its compute dtype comes from the environment
                env = {**reference_env, "NANOCHAT_DTYPE": "bfloat16" if dtype == "bf16" else "float32"}
            load = os.getloadavg()[0]
            result = run_worker(row_spec, args.threads, env)
            result.setdefault("load_avg_1m", load)
            r = summarise(name, result, spec, peaks)
            r["round"] = round_index + 1
            print(f"  round {round_index + 1} {name}: " + (f"{r['tok_per_s']:.0f} tok/s" if "error" not in r else r["error"]),
                  flush=True)
            kept = best_rows.get(name)
            if kept is None or ("error" in kept and "error" not in r) or (
                    "error" not in r and r["tok_per_s"] > kept["tok_per_s"]):
                best_rows[name] = r
            if on_row is not None:
                on_row([best_rows[n] for n in variants if n in best_rows])
    return [best_rows[name] for name in variants]


def best_of_each_system(rows: list[dict]) -> dict[str, dict]:
    """{system: its fastest row} over the rows that ran."""
    best = {}
    for system in ("picochat", "reference"):
        ok = [r for r in rows if r["system"] == system and "error" not in r]
        if ok:
            best[system] = max(ok, key=lambda r: r["tok_per_s"])
    return best


def print_best(best: dict[str, dict], peaks: dict) -> float | None:
    """One line per system's best row (variant, dtype, MFU against each peak); returns the ratio."""
    print()
    for system, r in best.items():
        mfu = ", ".join(f"{r[f'mfu_{k}_peak']:.1f}% of the {k} peak" for k in ("bf16", "fp32")
                        if r[f"mfu_{k}_peak"] is not None) or "- (no peak known)"
        print(f"{system} best: {r['variant']} ({r['dtype']}, {'compiled' if r['compile'] else 'eager'}) "
              f"{r['tok_per_s']:,.0f} tok/s, MFU {mfu}")
    if "bf16" not in peaks:
        print("no bf16 peak: this CPU has no fast bf16 matmuls, or this GPU is not in picochat's table")
    if len(best) < 2:
        return None
    ratio = best["picochat"]["tok_per_s"] / best["reference"]["tok_per_s"]
    print(f"picochat best ({best['picochat']['variant']}) / reference best ({best['reference']['variant']}): "
          f"{ratio:.2f}x")
    return ratio


def main() -> int:
    args = parse_args()
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    # Imported here, not at the top: they import picochat, which sets OMP_WAIT_POLICY for this
    # process as it loads, and reference workers (which run this file too) must not get it.
    import torch
    from machine import describe_machine, format_machine
    from results import default_out, write_results

    from picochat.errors import UserError
    from picochat.runtime import cpu_supports_fast_bf16, pick_device

    torch.set_num_threads(args.threads)  # the machine record shows the threads every row gets
    try:
        device = pick_device(args.device)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    machine = describe_machine(device)
    print(format_machine(machine), flush=True)
    fast_bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_supports_fast_bf16()
    variants, notes = choose_variants(args, fast_bf16)
    spec = {"threads": args.threads, "depth": args.depth, "aspect_ratio": args.aspect_ratio,
            "head_dim": args.head_dim, "vocab": args.vocab, "seq_len": args.seq_len, "batch": args.batch_size,
            "steps": args.steps, "warmup": args.warmup, "loader_seconds": args.loader_seconds, "loader": args.loader,
            "data_dir": str(args.data_dir) if args.data_dir else None, "device": str(device)}
    print(f"shapes: depth {args.depth}, aspect {args.aspect_ratio}, head_dim {args.head_dim}, vocab {args.vocab}, "
          f"B={args.batch_size} T={args.seq_len}, {args.threads} threads", flush=True)
    # The bf16 peak only means something where bf16 matmuls have hardware support.
    peaks = run_worker({**spec, "kind": "peak", "peak_dtypes": ["fp32", "bf16"] if fast_bf16 else ["fp32"]},
                       args.threads)
    if "error" in peaks:
        print(f"peak measurement failed: {peaks['error']}", file=sys.stderr)
        return 1
    peaks.pop("omp_wait_policy")
    print("measured matmul peak: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()), flush=True)

    out = args.out or default_out("train")
    partial = {"machine": machine, "partial": True, "peak_gflops": {k: round(v / 1e9, 1) for k, v in peaks.items()}}
    rows = run_rounds(variants, spec, peaks, args,
                      on_row=lambda so_far: write_results(out, {**partial, "rows": so_far}, announce=False))
    loader = {"skipped": "--skip-loader"} if args.skip_loader else run_worker({**spec, "kind": "loader"}, args.threads)

    print()
    print_table(rows)
    best = best_of_each_system(rows)
    ratio = print_best(best, peaks)
    if "tok_per_s" in loader:
        print(f"loader ({args.loader}): {loader['tok_per_s']:,.0f} tok/s ({loader['batches']} batches of "
              f"{args.batch_size}x{args.seq_len} in {loader['seconds']:.1f} s after a first batch in "
              f"{loader['first_batch_s']:.2f} s; tokenizer {loader['tokenizer']})")
    else:
        print(f"loader: {loader.get('skipped') or loader.get('error')}")
    for note in notes:
        print(f"note: {note}")
    results = {"machine": machine,
               "shapes": {k: spec[k] for k in ("depth", "aspect_ratio", "head_dim", "vocab", "seq_len", "batch",
                                               "threads")},
               "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
               "peak_gflops": {k: round(v / 1e9, 1) for k, v in peaks.items()}, "rows": rows,
               "best": {system: {k: r[k] for k in ("variant", "dtype", "compile", "tok_per_s", "mfu_fp32_peak",
                                                   "mfu_bf16_peak")} for system, r in best.items()},
               "ratio_best": None if ratio is None else round(ratio, 3),
               "reference_env": dict(item.split("=", 1) for item in args.reference_env), "loader": loader,
               "notes": notes, "load_avg_end": os.getloadavg()}
    print(json.dumps(results))
    return 0 if write_results(out, results) else 1


if __name__ == "__main__":
    sys.exit(main())
