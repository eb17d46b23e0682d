"""The softcapped cross-entropy's elementwise work in one pass per row, through a C kernel.

`softcap_ce_rows(a, targets, cap, shift, want_grad)` takes the (n, V) pre-activations
a = x @ (2 W / cap).T of one chunk (fp32 or bf16, contiguous), and returns the per-row loss and
sum of exp(z + shift) (fp32, (n,) each); with want_grad it overwrites `a` with the per-row
gradient factor g = (exp(z + shift) - onehot * sum) * s * (1 - s) (see picochat/model/gpt.py,
_softcap_cross_entropy_chunks, for the algebra). The torch version of the same takes ~9 passes
over the chunk; softcap_ce.c (beside this file) one read and one write.

The kernel is compiled on first use (picochat/kernels.py) and checked against float64 torch on a
small problem. `add_into(acc, src)` is acc += src for an fp32 acc and a bf16 src of the same
shape, in one pass (the lm_head gradient's sum over chunks). Where the kernel cannot be built, or
disagrees, or PICOCHAT_CPU_KERNEL=0, `available()` is False and the caller keeps its torch ops.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from picochat import kernels
from picochat.runtime import warn

SOURCE = Path(__file__).with_name("softcap_ce.c")
FALLBACK = "the training loss keeps torch's elementwise ops"


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    lib = kernels.load(SOURCE, FALLBACK, {"picochat_softcap_ce": "pillpffippi>", "picochat_add_bf16": "ppli>"})
    if lib is not None and not _agrees_with_torch(lib):
        warn(f"{SOURCE.name} disagrees with torch on a test problem: {FALLBACK}")
        return None
    return lib


def available() -> bool:
    return _library() is not None


def reference_rows(a: torch.Tensor, targets: torch.Tensor, cap: float, shift: float):
    """The same quantities with float64 torch ops: (loss, sum_exp, g)."""
    a = a.double()
    s = torch.sigmoid(a)
    z = cap * (2 * s - 1)
    e = torch.exp(z + shift)
    total = e.sum(dim=1)
    rows = torch.arange(a.size(0))
    loss = total.log() - shift - z[rows, targets]
    e[rows, targets] -= total
    return loss, total, e * s * (1 - s)


@torch.autocast("cpu", enabled=False)
def _agrees_with_torch(lib: ctypes.CDLL) -> bool:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(5, 37, generator=generator) * 4
    targets = torch.randint(0, 37, (5,), generator=generator)
    want = reference_rows(a, targets, 15.0, 15.0)
    got_loss, got_sum = softcap_ce_rows(a, targets, 15.0, 15.0, want_grad=True, lib=lib)
    scale = want[1][:, None]  # the caller divides g by the row's sum: compare on that scale
    return (torch.allclose(got_loss.double(), want[0], rtol=1e-5, atol=1e-5)
            and torch.allclose(got_sum.double(), want[1], rtol=1e-5)
            and torch.allclose(a.double() / scale, want[2] / scale, rtol=1e-4, atol=1e-6))


def softcap_ce_rows(a: torch.Tensor, targets: torch.Tensor, cap: float, shift: float, want_grad: bool,
                    lib: ctypes.CDLL | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, sum_exp), each (n,) fp32; with want_grad, `a` (n, V) becomes g in place."""
    lib = lib or _library()
    if lib is None:
        raise RuntimeError("the fused cross-entropy kernel is not available; check fused_ce.available() first")
    if a.dim() != 2 or not a.is_contiguous() or a.dtype not in (torch.float32, torch.bfloat16) or a.device.type != "cpu":
        raise ValueError(f"expected a contiguous 2-d fp32 or bf16 CPU tensor, got {tuple(a.shape)} {a.dtype}")
    n, vocab = a.shape
    targets = targets.to(torch.int64).contiguous()
    if targets.shape != (n,):
        raise ValueError(f"expected {n} targets, one per row, got shape {tuple(targets.shape)}")
    lo, hi = (int(targets.min()), int(targets.max())) if n else (0, 0)
    if lo < 0 or hi >= vocab:  # the kernel indexes the row with it: it would read and write another row
        raise ValueError(f"target id {lo if lo < 0 else hi} is out of bounds for a vocabulary of {vocab} "
                         f"(ids 0..{vocab - 1}; ignored targets are left out before this call); were the data tokenized for "
                         "another model?")
    loss, sum_exp = torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=torch.float32)
    lib.picochat_softcap_ce(a.data_ptr(), int(a.dtype == torch.bfloat16), n, vocab, targets.data_ptr(), cap, shift,
                            int(want_grad), loss.data_ptr(), sum_exp.data_ptr(), torch.get_num_threads())
    return loss, sum_exp


def add_into(acc: torch.Tensor, src: torch.Tensor) -> None:
    """acc += src: through the kernel for a contiguous fp32 acc and bf16 src on the CPU, else torch."""
    lib = _library()
    if (lib is None or acc.dtype != torch.float32 or src.dtype != torch.bfloat16 or acc.shape != src.shape
            or acc.device.type != "cpu" or src.device.type != "cpu" or not (acc.is_contiguous() and src.is_contiguous())):
        acc.add_(src)
        return
    lib.picochat_add_bf16(acc.data_ptr(), src.data_ptr(), acc.numel(), torch.get_num_threads())
