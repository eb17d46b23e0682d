"""Where and how we run: device and dtype, torch.distributed, seeds, logging, home dir.

One process drives one device. Under `torchrun` the world comes from the
environment (RANK, WORLD_SIZE, LOCAL_RANK); alone, the world is 1.
"""

from __future__ import annotations

import gc
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from picochat.errors import ConfigError


def home() -> Path:
    """$PICOCHAT_HOME, default ~/.cache/picochat: data, tokenizer, checkpoints, logs, reports."""
    path = Path(os.environ.get("PICOCHAT_HOME", Path.home() / ".cache" / "picochat")).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise ConfigError(f"PICOCHAT_HOME={path} is not a writable directory ({e.strerror}); "
                          "point PICOCHAT_HOME at a directory you can write") from e
    return path


def pick_device(requested: str | None = None) -> torch.device:
    """'cuda' if present, then 'mps', else 'cpu'; or the one asked for (refused if absent)."""
    if requested in (None, "", "auto"):
        if not torch.cuda.is_available():
            mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
            return torch.device("mps" if mps else "cpu")
        requested = "cuda"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {requested}: CUDA is not available on this machine; use --device cpu")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: MPS is not available on this machine; use --device cpu")
    if requested == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    try:
        return torch.device(requested)
    except RuntimeError as e:
        raise ConfigError(f"--device {requested!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from e


def cpu_supports_fast_bf16() -> bool:
    """True when the CPU has AMX or AVX512-BF16, where bf16 matmuls beat fp32 by a wide margin."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


DTYPE_ENV = "PICOCHAT_DTYPE"


def pick_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    """Compute dtype for matmuls: bf16 on CUDA (sm80+) and on CPUs with AMX/AVX512-BF16, else fp32.

    `requested` (--dtype) wins; where it is auto or absent, $PICOCHAT_DTYPE (fp32|bf16|fp16)
    decides, which is how one switch forces a dtype on every command and test of a machine.
    Master weights and optimiser state stay fp32 in training; inference holds its weights in
    this dtype (picochat.infer.engine).
    """
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
             "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}
    forced = os.environ.get(DTYPE_ENV, "").strip().lower()
    for value, shown, hint in ((requested, f"--dtype {requested!r}", ""),
                               (forced, f"${DTYPE_ENV}={forced!r}", " (or unset it)")):
        if value not in (None, "", "auto"):
            if value not in names:
                raise ConfigError(f"{shown} is unknown; use auto, bf16, fp32 or fp16{hint}")
            return names[value]
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float32
    return torch.bfloat16 if device.type == "cpu" and cpu_supports_fast_bf16() else torch.float32


def pick_training_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    """pick_dtype for a training stage, which refuses fp16: its gradients need loss scaling to stay
    clear of underflow, and the training loop does none (bf16 has fp32's range and needs none)."""
    dtype = pick_dtype(device, requested)
    if dtype == torch.float16:
        where = "--dtype" if requested not in (None, "", "auto") else f"${DTYPE_ENV}"
        raise ConfigError(f"{where} fp16: training in fp16 needs loss scaling, which picochat does not do; "
                          "use bf16 (CUDA sm80+, CPUs with fast bf16) or fp32")
    return dtype


@dataclass
class Dist:
    """This process's place in the world."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def cpu_threads_per_rank(world_size: int) -> int:
    """Threads for one CPU rank: this machine's usable cores shared by the ranks on this machine.

    The ranks on one machine are LOCAL_WORLD_SIZE (torchrun sets it), not the whole world: two
    machines of 16 cores with 2 ranks each give every rank 8 threads. The cores are those this
    process may run on (its affinity mask, as under taskset or a container's cpuset).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) or world_size))


def init_distributed(device_request: str | None = None) -> Dist:
    """Join the torchrun world if there is one (nccl on GPU, gloo on CPU); else a world of 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = pick_device(device_request)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    if device.type == "cpu" and world_size > 1:
        torch.set_num_threads(cpu_threads_per_rank(world_size))
    return Dist(rank=rank, world_size=world_size, device=device)


def shutdown_distributed() -> None:
    """Leave the process group; call it from a `finally:`.

    On the normal path the ranks meet at a barrier first: a gloo rank that tears down its
    connections while its peer is still closing its own can abort the peer ("terminate called
    without an active exception", SIGABRT). While an exception propagates, no barrier: the
    other ranks may never get there, and the launcher stops them anyway.
    Then a collection, so that a group or finished work object that a reference cycle still holds is
    freed now: freed during interpreter shutdown, a gloo thread that drops its last tensor reference
    takes the GIL too late and aborts the process the same way.
    """
    if not dist.is_initialized():
        return
    if sys.exc_info()[0] is None:
        dist.barrier()
    dist.destroy_process_group()
    gc.collect()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def log0(*parts: object) -> None:
    """Print on rank 0 only, flushed (so progress shows under torchrun and pipes)."""
    if is_main_process():
        print(*parts, flush=True)


def warn(message: str) -> None:
    if is_main_process():
        print(f"warning: {message}", file=sys.stderr, flush=True)
