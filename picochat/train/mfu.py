"""Peak FLOP/s per device, for model FLOPs utilisation (MFU) in the step log.

GPUs come from a table of dense (no sparsity) peaks. A CPU's peak is measured once
with a large matmul in the compute dtype and cached in $PICOCHAT_HOME/cpu_peak.json.
"""

from __future__ import annotations

import json
import time

import torch

from picochat.runtime import home

# Dense peak FLOP/s by GPU name fragment, for bf16 (fp32 peaks differ; MFU is stated for bf16 on GPU).
GPU_PEAK_BF16 = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12, "MI300X": 1307e12,
}


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
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, peak in GPU_PEAK_BF16.items():
            if fragment in name:
                return peak if dtype in (torch.bfloat16, torch.float16) else peak / 2
        return float("nan")
    if device.type != "cpu":
        return float("nan")
    cache = home() / "cpu_peak.json"
    key = f"{dtype!s}-threads{torch.get_num_threads()}-v2"  # v2: best of several trials
    table = {}
    if cache.exists():
        try:
            table = json.loads(cache.read_text())
        except json.JSONDecodeError:
            table = {}
    if key not in table:
        table[key] = measure_cpu_peak(dtype)
        cache.write_text(json.dumps(table, indent=1))
    return table[key]
