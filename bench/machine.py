"""Which kind of machine a benchmark ran on, for the header and the JSON of every bench script.

Speed on a CPU depends mostly on its vector and matrix units: AVX2 only, AVX-512, AVX512-BF16
(bf16 dot products) or AMX (bf16 tile matmuls), which is also what `--dtype auto` looks at. The
record names those flags, the CPU model, the cores and torch threads, torch's version, the GPU if
one is used, and the compute dtype `auto` resolves to here ($PICOCHAT_DTYPE included).
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

from picochat.runtime import DTYPE_ENV, cpu_supports_fast_bf16, pick_dtype

# The flags that decide matmul speed (x86: /proc/cpuinfo "flags"; Arm: "Features").
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
               "asimd", "sve", "bf16")
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def cpu_flags_of(cpuinfo: str) -> set[str]:
    """Every flag listed on the first "flags" (x86) or "Features" (Arm) line of /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_model_of(cpuinfo: str) -> str | None:
    """The CPU's model name from /proc/cpuinfo text, or None when it does not say."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model name", "Hardware") and value.strip():
            return value.strip()
    return None


def kind_of(flags: set[str], gpu: str | None) -> str:
    """A short label for the machine kind, one row of the README's tables per label."""
    if gpu:
        return f"CUDA {gpu}"
    for flag, label in (("amx_bf16", "CPU AMX"), ("avx512_bf16", "CPU AVX512-BF16"), ("avx512f", "CPU AVX-512"),
                        ("avx2", "CPU AVX2"), ("sve", "CPU Arm SVE"), ("asimd", "CPU Arm NEON")):
        if flag in flags:
            return label
    return f"CPU {platform.machine()}"


def _lscpu_model() -> str | None:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return cpu_model_of(out)


def describe_machine(device: torch.device) -> dict:
    """The machine record: kind, CPU model and speed flags, cores, torch threads and version, GPU, auto dtype."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    flags = cpu_flags_of(cpuinfo)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"kind": kind_of(flags, gpu),
            "cpu_model": cpu_model_of(cpuinfo) or _lscpu_model() or platform.processor() or "unknown",
            "arch": platform.machine(),
            "cpu_flags": [f for f in SPEED_FLAGS if f in flags],
            "fast_bf16": cpu_supports_fast_bf16(),
            "cpus": os.cpu_count(), "cpus_usable": usable,
            "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
            "device": str(device), "gpu": gpu,
            "auto_dtype": DTYPE_NAMES.get(pick_dtype(device), str(pick_dtype(device))),
            "dtype_env": os.environ.get(DTYPE_ENV) or None,
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def format_machine(info: dict) -> str:
    """The record as the two header lines a benchmark prints first."""
    flags = " ".join(info["cpu_flags"]) or "none of " + " ".join(SPEED_FLAGS[:5])
    forced = f" (${DTYPE_ENV}={info['dtype_env']})" if info["dtype_env"] else ""
    gpu = f", GPU {info['gpu']}" if info["gpu"] else ""
    return (f"machine: {info['kind']}: {info['cpu_model']} ({info['arch']}), {info['cpus_usable']} of "
            f"{info['cpus']} CPUs usable, flags: {flags}{gpu}\n"
            f"torch {info['torch_version']}, {info['torch_threads']} threads, device {info['device']}, "
            f"auto dtype {info['auto_dtype']}{forced}, load average {info['load_avg_1m']}")
