"""Muon: Newton-Schulz orthogonalisation, the step rule, and the momentum schedule."""

from __future__ import annotations

import math

import pytest
import torch

from picochat.optim import Muon, muon_momentum, newton_schulz


def matrix_with_spectrum(rows: int, cols: int, singular_values: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=g))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g))
    k = min(rows, cols)
    return u[:, :k] @ torch.diag(singular_values) @ v[:, :k].T


@pytest.mark.parametrize("shape", [(96, 48), (48, 96), (64, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_newton_schulz_pushes_every_singular_value_into_a_band_around_one(shape, dtype) -> None:
    rows, cols = shape
    # A badly conditioned input: singular values spread over two decades. (Five steps lift
    # any singular value above ~1/500 of the Frobenius norm into the band; smaller ones lag.)
    spectrum = torch.logspace(-1, 1, min(rows, cols))
    G = matrix_with_spectrum(rows, cols, spectrum)[None]
    out = newton_schulz(G, steps=5, dtype=dtype)
    assert out.shape == G.shape and out.dtype == G.dtype
    s = torch.linalg.svdvals(out[0])
    assert s.min() > 0.6 and s.max() < 1.25, (s.min(), s.max())
    # Same singular vectors as the input: out ~ U V^T, so U^T out V is near-diagonal.
    u, _, vh = torch.linalg.svd(G[0], full_matrices=False)
    core = u.T @ out[0] @ vh.T
    off_diagonal = core - torch.diag(torch.diagonal(core))
    assert off_diagonal.abs().max() < 0.05


def test_newton_schulz_handles_a_stack() -> None:
    G = torch.randn(3, 40, 20)
    stacked = newton_schulz(G, dtype=torch.float32)
    for i in range(3):
        torch.testing.assert_close(stacked[i], newton_schulz(G[i:i + 1], dtype=torch.float32)[0],
                                   rtol=1e-4, atol=1e-5)


def test_muon_step_is_an_orthogonal_update_scaled_by_shape() -> None:
    torch.manual_seed(0)
    tall = torch.nn.Parameter(torch.zeros(64, 16))
    wide = torch.nn.Parameter(torch.zeros(16, 64))
    opt = Muon([tall, wide], lr=0.1, momentum=0.9)
    tall.grad, wide.grad = torch.randn(64, 16), torch.randn(16, 64)
    opt.step()
    # First step: buffer = (1-m) g, nesterov update = (1-m) g + m (1-m) g, same direction as g.
    s_tall = torch.linalg.svdvals(tall.detach()) / (0.1 * math.sqrt(64 / 16))
    s_wide = torch.linalg.svdvals(wide.detach()) / 0.1
    for s in (s_tall, s_wide):
        assert s.min() > 0.6 and s.max() < 1.25
    assert torch.all(opt.state[tall]["momentum_buffer"] != 0)


def test_muon_weight_decay_and_momentum_are_per_group() -> None:
    decayed, plain = torch.nn.Parameter(torch.ones(8, 8)), torch.nn.Parameter(torch.ones(8, 8))
    # The defaults (another lr, momentum and decay) must not leak into either group.
    opt = Muon([{"params": [decayed], "lr": 0.5, "momentum": 0.0, "weight_decay": 0.1},
                {"params": [plain], "lr": 0.5, "momentum": 0.9, "weight_decay": 0.0}],
               lr=0.02, momentum=0.5, weight_decay=0.3)
    decayed.grad, plain.grad = torch.zeros(8, 8), torch.zeros(8, 8)  # zero gradient: only the decay acts
    opt.step()
    torch.testing.assert_close(decayed.detach(), torch.full((8, 8), 0.95))
    torch.testing.assert_close(plain.detach(), torch.ones(8, 8))
    # Each group's momentum: buffer <- m * buffer + (1 - m) * grad, from the zero buffers of the first step.
    g = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    decayed.grad, plain.grad = g.clone(), g.clone()
    opt.step()
    torch.testing.assert_close(opt.state[decayed]["momentum_buffer"], g)
    torch.testing.assert_close(opt.state[plain]["momentum_buffer"], 0.1 * g)


def test_muon_refuses_non_matrices() -> None:
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(4))])


def test_muon_momentum_schedule() -> None:
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95)
    assert muon_momentum(10_000) == pytest.approx(0.95)
    assert muon_momentum(5, warmup_steps=10, start=0.5, end=1.0) == pytest.approx(0.75)
    assert muon_momentum(0, warmup_steps=0) == 0.95
