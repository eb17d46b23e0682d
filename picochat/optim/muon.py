"""Muon: momentum SGD whose update for each 2-D matrix is orthogonalised.

Each step: EMA momentum of the gradient, a Nesterov look-ahead, then the update
matrix is replaced by its nearest semi-orthogonal matrix (all singular values
pushed towards 1) with a few polynomial iterations. So every direction of a
weight matrix moves by about the same amount, however skewed the raw gradient's
spectrum is. Meant for the hidden matrices only; embeddings and the lm_head go to
AdamW (see picochat.optim.build_optimizers).

`MuonOptions` chooses the rule; the defaults are the classic one (quintic Newton-Schulz,
plain decoupled weight decay). The options, in the order a step applies them:
- `row_equilibration`: before orthogonalising, every row of the update is rescaled to the
  matrix's root-mean-square row norm, so the spectrum the iteration sees is better conditioned;
- `orthogonalizer="polar_express"`: per-step quintic coefficients, each the minimax polynomial
  for the interval of singular values the previous steps leave (`polar_express_coefficients`),
  instead of one fixed quintic repeated;
- `renormalize`: the orthogonalised update is scaled to Frobenius norm sqrt(min(rows, cols)),
  the norm of an exactly semi-orthogonal matrix, correcting an iteration that fell short;
- `normuon_beta2`: an EMA of the update's mean square over the shorter side (one entry per row
  of a tall or square matrix, per column of a wide one) rescales those rows/columns to even
  size, then the whole matrix back to its Frobenius norm before the rescale;
- `cautious_weight_decay`: a weight decays only where the update has the weight's sign.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from picochat.errors import ConfigError
from picochat.runtime import cpu_supports_fast_bf16

# Quintic Newton-Schulz coefficients: a steep slope at 0 (a) pulls small singular values
# up fast; the iteration then oscillates in a band around 1 instead of converging exactly,
# which is all an optimiser step needs.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


_cpu_bf16_is_fast = functools.cache(cpu_supports_fast_bf16)  # reads /proc/cpuinfo: once per process is enough


def orthogonalisation_dtype(device: torch.device) -> torch.dtype:
    """bf16 where its matmuls are fast (CUDA, CPUs with AMX/AVX512-BF16), else fp32.

    (On a CPU without them, bf16 matmuls run ~50x slower than fp32.)
    """
    fast = device.type == "cuda" or (device.type == "cpu" and _cpu_bf16_is_fast())
    return torch.bfloat16 if fast else torch.float32


def _minimax_odd_quintic(lo: float, hi: float) -> tuple[float, float, float]:
    """(a, b, c) of the a x + b x^3 + c x^5 closest to 1 in max norm on [lo, hi], by Remez exchange."""
    if lo / hi >= 1 - 5e-6:  # a degenerate interval: the limit of the minimax polynomials
        return 15 / 8 / hi, -10 / 8 / hi**3, 3 / 8 / hi**5
    nodes, error = np.array([lo, (3 * lo + hi) / 4, (lo + 3 * hi) / 4, hi]), None
    for _ in range(100):
        # The error alternates in sign over the four nodes and has equal size at each.
        system = np.stack([nodes, nodes**3, nodes**5, np.array([1.0, -1.0, 1.0, -1.0])], axis=1)
        a, b, c, e = np.linalg.solve(system, np.ones(4))
        # New interior nodes: the extrema of p, where p'(x) = a + 3b x^2 + 5c x^4 = 0.
        inner = np.sqrt((-3 * b + np.array([-1.0, 1.0]) * math.sqrt(9 * b * b - 20 * a * c)) / (10 * c))
        nodes = np.array([lo, inner[0], inner[1], hi])
        if error is not None and abs(e - error) <= 1e-15:
            break
        error = e
    return float(a), float(b), float(c)


@functools.cache
def polar_express_coefficients(steps: int = 5, lower: float = 1e-3, safety: float = 0.02,
                               cushion: float = 0.02) -> tuple[tuple[float, float, float], ...]:
    """Per-step (a, b, c) of Polar Express, greedy from the singular-value interval [lower, 1].

    Each step's quintic is the minimax approximation of 1 on the interval the previous steps
    leave, its low end kept at least `cushion` * the high end (so no step's polynomial gets too
    steep), then scaled so the interval's image is centred on 1. Every step but the last also
    takes inputs up to 1 + `safety` (its coefficients are divided by (1+safety)^(1, 3, 5)), so
    rounding that lifts a singular value a little above the interval does no harm.
    """
    lo, hi, out = lower, 1.0, []
    for i in range(steps):
        a, b, c = _minimax_odd_quintic(max(lo, cushion * hi), hi)
        centre = 2 / (a * (lo + hi) + b * (lo**3 + hi**3) + c * (lo**5 + hi**5))
        a, b, c = a * centre, b * centre, c * centre
        if i < steps - 1:
            s = 1 + safety
            a, b, c = a / s, b / s**3, c / s**5
        out.append((a, b, c))
        lo = a * lo + b * lo**3 + c * lo**5
        hi = 2 - lo
    return tuple(out)


def _orthogonalise(G: torch.Tensor, coefficients: Iterable[tuple[float, float, float]], dtype: torch.dtype | None,
                   norm_margin: float, eps: float) -> torch.Tensor:
    """Apply X <- a X + (b A + c A^2) X, A = X X^T, per coefficient triple, to a stack G (K, m, n)."""
    X = G.to(dtype or orthogonalisation_dtype(G.device))
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT  # iterate on the wide side: X @ X.T is then the smaller (m, m) Gram matrix
    # Frobenius norm >= spectral norm, so every singular value starts in [0, 1 / norm_margin].
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * norm_margin + eps)
    for a, b, c in coefficients:
        A = X @ X.mT  # (K, m, m)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b*A + c*A@A
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)  # a*X + B@X
    if tall:
        X = X.mT
    return X.to(G.dtype)


def newton_schulz(G: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximate U V^T of G = U S V^T for a stack of matrices G (K, m, n); returns G's dtype."""
    return _orthogonalise(G, [NS_COEFFICIENTS] * steps, dtype, 1.0, 1e-7)


def polar_express(G: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Like `newton_schulz`, with `polar_express_coefficients(steps)`: closer to U V^T in as many steps."""
    return _orthogonalise(G, polar_express_coefficients(steps), dtype, 1.01, 1e-6)


ORTHOGONALISERS = {"newton_schulz": newton_schulz, "polar_express": polar_express}


@dataclass(frozen=True)
class MuonOptions:
    """How Muon turns momentum into an update (module docstring); the defaults are the classic rule."""

    orthogonalizer: str = "newton_schulz"  # or "polar_express"
    ns_steps: int = 5  # orthogonalisation iterations
    nesterov: bool = True  # orthogonalise g + m (buf - g) instead of buf
    row_equilibration: bool = False
    renormalize: bool = False
    normuon_beta2: float | None = None  # None: no second moment
    cautious_weight_decay: bool = False

    def __post_init__(self) -> None:
        if self.orthogonalizer not in ORTHOGONALISERS:
            raise ConfigError(f"--muon-orthogonalizer {self.orthogonalizer!r} is unknown; "
                              f"choose one of {', '.join(ORTHOGONALISERS)}")
        if self.ns_steps < 1:
            raise ConfigError(f"--muon-ns-steps {self.ns_steps} must be at least 1")
        if self.normuon_beta2 is not None and not 0.0 <= self.normuon_beta2 < 1.0:
            raise ConfigError(f"--normuon-beta2 {self.normuon_beta2} must be in [0, 1)")

    def describe(self) -> str:
        """The options that differ from the defaults, as 'name=value ...' ('' for the classic rule)."""
        default = MuonOptions()
        return " ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                        if getattr(self, f.name) != getattr(default, f.name))


OPTION_NAMES = tuple(f.name for f in fields(MuonOptions))


def second_moment_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """NorMuon's state for a (rows, cols) matrix: (rows, 1) when rows >= cols, else (1, cols)."""
    rows, cols = shape
    return (rows, 1) if rows >= cols else (1, cols)


def muon_state_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of Muon's state `key` for a matrix of `shape`."""
    return second_moment_shape(shape) if key == "second_moment" else tuple(shape)


def equilibrate_rows(X: torch.Tensor) -> torch.Tensor:
    """Scale every row of each matrix in X (K, m, n) to the matrix's root-mean-square row norm."""
    Xf = X.float()
    target = Xf.norm(dim=(-2, -1), keepdim=True) / math.sqrt(X.size(-2))  # (K, 1, 1)
    return (Xf * (target / Xf.norm(dim=-1, keepdim=True).clamp_min(1e-6))).to(X.dtype)


def renormalize(X: torch.Tensor) -> torch.Tensor:
    """Scale each matrix in X (K, m, n) to Frobenius norm sqrt(min(m, n))."""
    norm = X.float().norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
    return X * (math.sqrt(min(X.shape[-2:])) / norm).to(X.dtype)


def normuon_rescale(X: torch.Tensor, second_moments: list[torch.Tensor], beta2: float) -> torch.Tensor:
    """Even out the rows (or columns) of each update in X (K, m, n) by their second moment, in place
    on `second_moments` (K tensors of `second_moment_shape`), keeping each matrix's Frobenius norm."""
    rows, cols = X.shape[-2:]
    mean_sq = X.float().square().mean(dim=-1 if rows >= cols else -2, keepdim=True)  # (K, m, 1) or (K, 1, n)
    torch._foreach_lerp_(second_moments, list(mean_sq.to(second_moments[0].dtype).unbind(0)), 1.0 - beta2)
    scale = torch.stack(second_moments).float().clamp_min(1e-10).rsqrt()
    # ||X||_F^2 and ||X * scale||_F^2, both up to the same factor (the length of the averaged side).
    before = mean_sq.sum(dim=(-2, -1), keepdim=True)
    after = (mean_sq * scale.square()).sum(dim=(-2, -1), keepdim=True)
    return X * (scale * (before / after.clamp_min(1e-20)).sqrt()).to(X.dtype)


class Muon(torch.optim.Optimizer):
    """Orthogonalised momentum for 2-D parameters.

    Per group: lr, momentum (the training loop schedules it), weight_decay (decoupled:
    p <- p * (1 - lr * wd)) and the `MuonOptions` fields (keyword arguments here). The step of
    a (rows, cols) matrix is scaled by sqrt(max(1, rows/cols)), so tall matrices, whose
    orthogonal update has a smaller rms per entry, move as much per entry as square ones.
    `ns_dtype` is the orthogonalisation dtype (None: `orthogonalisation_dtype` of the device);
    it is not saved with the state. State per matrix: `momentum_buffer`, and `second_moment`
    with NorMuon.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0,
                 ns_dtype: torch.dtype | None = None, **options: Any) -> None:
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, **asdict(MuonOptions(**options))}
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            MuonOptions(**{k: group[k] for k in OPTION_NAMES})  # a group's own options are checked too
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only takes 2-D parameters, got shape {tuple(p.shape)}")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # a state saved before an option existed: that option is off
            for key, value in asdict(MuonOptions()).items():
                group.setdefault(key, value)

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            by_shape: dict[torch.Size, list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    by_shape[p.shape].append(p)
            # One batched orthogonalisation per shape: fewer, larger matmuls.
            for params in by_shape.values():
                self._update(group, params)

    def _update(self, group: dict, params: list[torch.Tensor]) -> None:
        """One step for same-shape matrices: momentum, orthogonalise, rescale, decay, apply."""
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        rows, cols = params[0].shape
        grads = [p.grad for p in params]
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
        bufs = [state["momentum_buffer"] for state in states]
        torch._foreach_lerp_(bufs, grads, 1.0 - momentum)  # buf <- m*buf + (1-m)*g
        updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
        stacked = torch.stack(updates)  # (K, rows, cols)
        if group["row_equilibration"]:
            stacked = equilibrate_rows(stacked)
        ortho = ORTHOGONALISERS[group["orthogonalizer"]](stacked, steps=group["ns_steps"], dtype=self.ns_dtype)
        if group["renormalize"]:
            ortho = renormalize(ortho)
        if group["normuon_beta2"] is not None:
            for p, state in zip(params, states):
                if "second_moment" not in state:
                    state["second_moment"] = p.new_zeros(second_moment_shape(p.shape))
            ortho = normuon_rescale(ortho, [state["second_moment"] for state in states], group["normuon_beta2"])
        if wd != 0.0 and group["cautious_weight_decay"]:
            # Decay only where the step moves the weight towards zero anyway (update and weight agree in sign).
            agree = ortho * torch.stack(params) >= 0
            torch._foreach_mul_(params, list(torch.where(agree, 1.0 - lr * wd, 1.0).unbind(0)))
        elif wd != 0.0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_add_(params, list(ortho.unbind(0)), alpha=-lr * math.sqrt(max(1.0, rows / cols)))
