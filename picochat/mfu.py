"""Truthful throughput numbers: peak FLOP/s per device, MFU, and peak memory.

GPUs come from a table of dense (no sparsity) bf16 peaks; a GPU that is not in the table,
or a dtype the table does not cover, gives NaN (the step line prints "-"), never a guess.
A CPU's peak is measured with a large matmul in the compute dtype and cached in
$PICOCHAT_HOME/cpu_peak.json; a figure measured while other work shared the CPU is kept only until
a quieter start measures it again (the best figure wins), so MFU does not stay inflated.

MFU is cluster model FLOP/s over cluster peak: tokens/s of all ranks * FLOPs per token,
divided by world size * one device's peak.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import sys
import time

import torch

from picochat.fileio import write_json
from picochat.runtime import home

# Dense bf16 tensor-core peaks by device name, most specific pattern first: every word of a
# pattern must be a word of torch.cuda.get_device_name() (split at spaces and dashes, any
# case), so "L4" does not match "L40S" nor "H100" "GH200". An H100 PCIe (756 TFLOP/s) or NVL
# (835) is not an SXM (989), nor an H200 NVL (835) an H200 SXM (989); an H100 the table cannot
# tell apart prints "-".
GPU_PEAK_BF16: list[tuple[tuple[str, ...], float]] = [
    (("H100", "PCIe"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H100", "HBM3"), 989e12),  # SXM5 parts report "NVIDIA H100 80GB HBM3"
    (("H100", "SXM"), 989e12),
    (("H200", "NVL"), 835e12),
    (("H200",), 989e12),
    (("GH200",), 989e12),
    (("A100",), 312e12),
    (("L40S",), 362e12),
    (("L4",), 121e12),
    (("A10G",), 70e12),
    (("RTX", "4090"), 165e12),
    (("RTX", "3090"), 71e12),
]

# The allocator setting for CUDA training: segments grow in place instead of being carved
# into fixed blocks, which avoids most fragmentation failures with varying batch shapes.
CUDA_ALLOC_CONF = "expandable_segments:True"


def lookup_device(name: str, table: list) -> float:
    """The value of the first (words, value) row whose words all appear in a device name, else NaN."""
    have = set(re.split(r"[\s\-_]+", name.lower()))
    for words, value in table:
        if all(w.lower() in have for w in words):
            return value
    return float("nan")


def gpu_peak_bf16(name: str) -> float:
    """Dense bf16 FLOP/s of a GPU by its device name, or NaN when the table has no entry."""
    return lookup_device(name, GPU_PEAK_BF16)


def measure_cpu_peak(dtype: torch.dtype, size: int = 1024, seconds: float = 0.2, trials: int = 5) -> float:
    """FLOP/s of a (size x size) @ (size x size) matmul loop on this CPU in `dtype`.

    The best of several short trials: other processes on the machine can only slow a trial
    down, so the fastest one is the closest to the hardware's peak.
    """
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(trials):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            n += 1
        best = max(best, 2 * size**3 * n / (time.perf_counter() - t0))
    return best


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """One device's peak FLOP/s in `dtype`; NaN when it is not known."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return gpu_peak_bf16(torch.cuda.get_device_name(device))
    if device.type != "cpu":  # unknown; so is a GPU's fp32/TF32 peak (it depends on settings the table lacks)
        return float("nan")
    cache = home() / "cpu_peak.json"
    key = f"{dtype!s}-threads{torch.get_num_threads()}-v2"  # v2: best of several trials
    try:
        table = json.loads(cache.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        table = {}
    entry = table.get(key)
    if isinstance(entry, (int, float)):  # measured on a quiet machine: final
        return float(entry)
    # Not measured yet, or measured while other work shared the CPU (which can only slow the matmul,
    # so the MFU read high): measure, keep the best figure so far, and settle once a start is quiet.
    try:  # cores' worth of runnable work besides this process: the 1-minute load average less one
        load = max(0.0, os.getloadavg()[0] - 1.0)
    except OSError:  # no load average on this platform
        load = 0.0
    best = max(measure_cpu_peak(dtype), entry["flops"] if isinstance(entry, dict) else 0.0)
    busy = load >= 0.5 * torch.get_num_threads()
    table[key] = {"flops": best, "busy_load": round(load, 2)} if busy else best
    write_json(cache, table, indent=1)
    if busy:
        print(f"note: the CPU's peak FLOP/s was measured while other work used {load:.1f} cores; MFU may read "
              f"high until a quieter start measures it again ({cache})", file=sys.stderr, flush=True)
    return best


def mfu_percent(flops_per_token: float, cluster_tokens_per_s: float, device_peak: float, world_size: int) -> float:
    """Model FLOPs utilisation in percent: achieved cluster FLOP/s over world_size * device peak."""
    if math.isnan(device_peak) or device_peak <= 0:  # unknown device
        return float("nan")
    return 100.0 * flops_per_token * cluster_tokens_per_s / (world_size * device_peak)


def use_expandable_segments() -> None:
    """Ask the CUDA caching allocator for expandable segments, unless the user set the allocator.

    Must run before CUDA is initialised (the allocator reads the variable once), so the
    training commands call it first thing.
    """
    current = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if "expandable_segments" not in current:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ",".join(filter(None, [current, CUDA_ALLOC_CONF]))


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process on `device` so far.

    CUDA: torch.cuda.max_memory_allocated (tensors only, not the allocator's cache).
    CPU: the process's peak resident set size (getrusage ru_maxrss): everything the process
    touched, Python and torch's own code included, so it is an upper bound on tensor memory.
    """
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux
