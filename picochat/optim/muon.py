"""Muon: momentum SGD whose update for each 2-D matrix is orthogonalised.

Each step: EMA momentum of the gradient, a Nesterov look-ahead, then the update
matrix is replaced by its nearest semi-orthogonal matrix (all singular values
pushed towards 1) with a few Newton-Schulz iterations. So every direction of a
weight matrix moves by about the same amount, however skewed the raw gradient's
spectrum is. Meant for the hidden matrices only; embeddings and the lm_head go to
AdamW (see picochat.optim.build_optimizers).
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch

from picochat.runtime import cpu_supports_fast_bf16

# Quintic Newton-Schulz coefficients: a steep slope at 0 (a) pulls small singular values
# up fast; the iteration then oscillates in a band around 1 instead of converging exactly,
# which is all an optimiser step needs.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


@functools.cache
def _cpu_bf16_is_fast() -> bool:
    return cpu_supports_fast_bf16()  # reads /proc/cpuinfo: once per process is enough


def orthogonalisation_dtype(device: torch.device) -> torch.dtype:
    """bf16 where its matmuls are fast (CUDA, CPUs with AMX/AVX512-BF16), else fp32.

    (On a CPU without them, bf16 matmuls run ~50x slower than fp32.)
    """
    if device.type == "cuda" or (device.type == "cpu" and _cpu_bf16_is_fast()):
        return torch.bfloat16
    return torch.float32


def newton_schulz(G: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximate U V^T of G = U S V^T for a stack of matrices G (K, m, n); returns G's dtype."""
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype or orthogonalisation_dtype(G.device))
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT  # iterate on the wide side: X @ X.T is then the smaller (m, m) Gram matrix
    # Frobenius norm >= spectral norm, so every singular value starts in [0, 1].
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT  # (K, m, m)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b*A + c*A@A
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)  # a*X + B@X
    if tall:
        X = X.mT
    return X.to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Orthogonalised momentum for 2-D parameters.

    Per group: lr, momentum (the training loop schedules it), nesterov, ns_steps and
    weight_decay (decoupled: p <- p * (1 - lr * wd)). The step of a (rows, cols) matrix
    is scaled by sqrt(max(1, rows/cols)), so tall matrices, whose orthogonal update has a
    smaller rms per entry, move as much per entry as square ones. `ns_dtype` is the
    Newton-Schulz dtype (None: `orthogonalisation_dtype` of the device); it is not saved
    with the state.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.02, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, weight_decay: float = 0.0,
                 ns_dtype: torch.dtype | None = None) -> None:
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "ns_steps": ns_steps,
                        "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only takes 2-D parameters, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            by_shape: dict[torch.Size, list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    by_shape[p.shape].append(p)
            # One batched orthogonalisation per shape: fewer, larger matmuls.
            for shape, params in by_shape.items():
                grads = [p.grad for p in params]
                bufs = []
                for p in params:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    bufs.append(state["momentum_buffer"])
                torch._foreach_lerp_(bufs, grads, 1.0 - momentum)  # buf <- m*buf + (1-m)*g
                updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
                # (K, rows, cols)
                ortho = newton_schulz(torch.stack(updates), steps=group["ns_steps"], dtype=self.ns_dtype)
                if wd != 0.0:
                    torch._foreach_mul_(params, 1.0 - lr * wd)
                scale = math.sqrt(max(1.0, shape[0] / shape[1]))
                torch._foreach_add_(params, list(ortho.unbind(0)), alpha=-lr * scale)
        return loss
