"""Muon's optional update rules: Polar Express, MuonEq, Muon+, NorMuon, cautious weight decay.

The defaults must stay the classic rule bit for bit: a frozen copy of that rule's math is the
reference for them.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from picochat.errors import ConfigError
from picochat.optim import Muon, MuonOptions, build_optimizers, muon_momentum, newton_schulz, polar_express
from picochat.optim.muon import (
    equilibrate_rows,
    normuon_rescale,
    polar_express_coefficients,
    renormalize,
    second_moment_shape,
)
from tests.optim.test_build import tiny_model
from tests.optim.test_muon import matrix_with_spectrum

# Polar Express for 5 steps from [1e-3, 1], safety 0.02, cushion 0.02, as published with the method.
PUBLISHED_COEFFICIENTS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
ALL_OPTIONS = MuonOptions(orthogonalizer="polar_express", row_equilibration=True, renormalize=True,
                          normuon_beta2=0.9, cautious_weight_decay=True)


def frozen_classic_step(params: list[torch.Tensor], bufs: list[torch.Tensor], lr: float, momentum: float,
                        wd: float, dtype: torch.dtype) -> None:
    """The classic Muon step (Nesterov, 5 quintic Newton-Schulz steps, decoupled decay), frozen."""
    grads = [p.grad for p in params]
    torch._foreach_lerp_(bufs, grads, 1.0 - momentum)
    X = torch.stack(torch._foreach_lerp(grads, bufs, momentum)).to(dtype)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(5):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=-4.7750, alpha=2.0315)
        X = torch.baddbmm(X, B, X, beta=3.4445, alpha=1.0)
    ortho = (X.mT if tall else X).to(params[0].dtype)
    if wd != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * wd)
    scale = math.sqrt(max(1.0, params[0].shape[0] / params[0].shape[1]))
    torch._foreach_add_(params, list(ortho.unbind(0)), alpha=-lr * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (24, 24)])
def test_the_default_rule_is_bit_identical_to_the_classic_one(shape, dtype) -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for _ in range(3)]
    frozen = [p.detach().clone() for p in params]
    bufs = [torch.zeros(shape) for _ in frozen]
    opt = Muon(params, lr=0.05, momentum=0.9, weight_decay=0.1, ns_dtype=dtype)
    for _ in range(3):
        grads = [torch.randn(shape) for _ in params]
        for p, f, g in zip(params, frozen, grads):
            p.grad, f.grad = g, g.clone()
        opt.step()
        frozen_classic_step(frozen, bufs, 0.05, 0.9, 0.1, dtype)
    for p, f, b in zip(params, frozen, bufs):
        assert torch.equal(p.detach(), f) and torch.equal(opt.state[p]["momentum_buffer"], b)


def test_polar_express_coefficients_match_the_published_table() -> None:
    derived = polar_express_coefficients(5)
    for mine, published in zip(derived, PUBLISHED_COEFFICIENTS, strict=True):
        assert mine == pytest.approx(published, abs=1e-9, rel=1e-9)
    # Fewer steps: the same greedy polynomials, the last one without the safety margin.
    assert polar_express_coefficients(3)[:2] == derived[:2] and polar_express_coefficients(3)[2] != derived[2]


@pytest.mark.parametrize("shape", [(96, 48), (48, 96), (64, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_polar_express_lands_every_singular_value_in_a_tighter_band(shape, dtype) -> None:
    rows, cols = shape
    G = matrix_with_spectrum(rows, cols, torch.logspace(-1, 1, min(rows, cols)))[None]
    out = polar_express(G, steps=5, dtype=dtype)
    assert out.shape == G.shape and out.dtype == G.dtype
    s = torch.linalg.svdvals(out[0])
    assert s.min() > 0.84 and s.max() < 1.15, (s.min(), s.max())
    classic = torch.linalg.svdvals(newton_schulz(G, steps=5, dtype=dtype)[0])
    assert s.max() - s.min() < 0.6 * (classic.max() - classic.min())
    u, _, vh = torch.linalg.svd(G[0], full_matrices=False)  # the input's singular vectors
    core = u.T @ out[0] @ vh.T
    assert (core - torch.diag(torch.diagonal(core))).abs().max() < 0.05


def test_row_equilibration_and_renormalisation() -> None:
    X = torch.randn(2, 12, 30) * torch.linspace(0.1, 3.0, 12)[:, None]  # rows of very different sizes
    eq = equilibrate_rows(X)
    row_norms = eq.norm(dim=-1)
    torch.testing.assert_close(row_norms, row_norms[:, :1].expand_as(row_norms))
    torch.testing.assert_close(eq.norm(dim=(-2, -1)), X.norm(dim=(-2, -1)))  # rms row norm kept
    torch.testing.assert_close(renormalize(X).norm(dim=(-2, -1)), torch.full((2,), math.sqrt(12)))


@pytest.mark.parametrize("shape", [(40, 10), (10, 40), (16, 16)])
def test_normuon_keeps_the_norm_and_evens_out_the_longer_side(shape) -> None:
    rows, cols = shape
    torch.manual_seed(0)
    uneven = torch.linspace(0.2, 2.0, max(shape))
    X = torch.randn(3, rows, cols) * (uneven[:, None] if rows >= cols else uneven[None, :])
    second = [torch.zeros(second_moment_shape(shape)) for _ in range(3)]
    for _ in range(60):  # the same update again and again: the EMA converges to its mean squares
        out = normuon_rescale(X, second, beta2=0.9)
        torch.testing.assert_close(out.norm(dim=(-2, -1)), X.norm(dim=(-2, -1)))
    side = out.norm(dim=-1) if rows >= cols else out.norm(dim=-2)  # per row of a tall/square one, column of a wide
    torch.testing.assert_close(side, side[:, :1].expand_as(side), rtol=1e-3, atol=0)


def test_cautious_weight_decay_spares_weights_the_update_pushes_away_from_zero() -> None:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(32, 16))
    plain = torch.nn.Parameter(p.detach().clone())
    before = p.detach().clone()
    cautious = Muon([p], lr=0.1, momentum=0.9, weight_decay=0.5, cautious_weight_decay=True, ns_dtype=torch.float32)
    no_decay = Muon([plain], lr=0.1, momentum=0.9, weight_decay=0.0, ns_dtype=torch.float32)
    p.grad = torch.randn(32, 16)
    plain.grad = p.grad.clone()
    cautious.step()
    no_decay.step()
    step = before - plain.detach()  # lr * scale * update: the sign of the update
    agree = step * before >= 0
    assert 0.2 < agree.float().mean() < 0.8  # both cases occur
    assert torch.equal(p.detach()[~agree], plain.detach()[~agree])  # not decayed at all
    torch.testing.assert_close(p.detach()[agree], (before * (1 - 0.1 * 0.5) - step)[agree])


def test_all_options_resume_exactly_from_a_state_dict() -> None:
    torch.manual_seed(0)
    shapes = [(48, 16), (48, 16), (16, 48)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(4)]
    opt = Muon(params, lr=0.05, momentum=0.9, weight_decay=0.2, **vars(ALL_OPTIONS))

    def step(optimizer, ps, k):
        for p, g in zip(ps, grads[k]):
            p.grad = g.clone()
        optimizer.step()

    for k in range(2):
        step(opt, params, k)
    saved_params, saved_state = [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())
    assert {tuple(s["second_moment"].shape) for s in saved_state["state"].values()} == {(48, 1), (1, 48)}
    for k in (2, 3):
        step(opt, params, k)
    resumed = [torch.nn.Parameter(p) for p in saved_params]
    fresh = Muon(resumed, lr=0.05, momentum=0.9, weight_decay=0.2, **vars(ALL_OPTIONS))
    fresh.load_state_dict(saved_state)
    for k in (2, 3):
        step(fresh, resumed, k)
    for p, q in zip(params, resumed):
        assert torch.equal(p.detach(), q.detach())
        assert torch.equal(opt.state[p]["second_moment"], fresh.state[q]["second_moment"])


def test_a_state_saved_before_the_options_existed_loads_as_the_classic_rule() -> None:
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = Muon([p])
    old = opt.state_dict()
    for key in vars(MuonOptions()):
        if key not in ("nesterov", "ns_steps"):
            del old["param_groups"][0][key]
    opt = Muon([p], orthogonalizer="polar_express")
    opt.load_state_dict(old)
    assert {k: opt.param_groups[0][k] for k in vars(MuonOptions())} == vars(MuonOptions())


def test_build_optimizers_passes_the_options_and_a_schedulable_decay(capsys) -> None:
    model = tiny_model()
    _, muon = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, weight_decay=0.01,
                               muon_options=ALL_OPTIONS, muon_weight_decay=0.2)
    (group,) = muon.param_groups
    assert {k: group[k] for k in vars(ALL_OPTIONS)} == vars(ALL_OPTIONS)
    assert group["weight_decay"] == group["initial_weight_decay"] == 0.2
    assert "orthogonalizer=polar_express" in capsys.readouterr().out
    _, classic = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, weight_decay=0.01)
    assert classic.param_groups[0]["initial_weight_decay"] == 0.01  # the shared decay by default


def test_bad_options_name_the_flag() -> None:
    with pytest.raises(ConfigError, match="--muon-orthogonalizer 'svd'"):
        MuonOptions(orthogonalizer="svd")
    with pytest.raises(ConfigError, match="--normuon-beta2 1.0"):
        MuonOptions(normuon_beta2=1.0)
    with pytest.raises(ConfigError, match="--muon-ns-steps 0"):
        Muon([torch.nn.Parameter(torch.zeros(4, 4))], ns_steps=0)


def test_momentum_warms_up_then_follows_the_lr_warmdown() -> None:
    schedule = {"warmup_steps": 400, "start": 0.85, "end": 0.97, "final": 0.90, "warmdown_ratio": 0.5,
                "num_iterations": 2000}
    assert muon_momentum(0, **schedule) == pytest.approx(0.85)
    assert muon_momentum(200, **schedule) == pytest.approx(0.91)
    assert muon_momentum(999, **schedule) == pytest.approx(0.97)
    assert muon_momentum(1000, **schedule) == pytest.approx(0.97)  # the warmdown starts here
    assert muon_momentum(1500, **schedule) == pytest.approx(0.935)
    assert muon_momentum(2000, **schedule) == pytest.approx(0.90)
    assert muon_momentum(1999, **{**schedule, "final": None}) == 0.97  # no final: constant after the warmup
    assert muon_momentum(100, **{**schedule, "num_iterations": 200}) == pytest.approx(0.88)  # warmup first


def reference_options_step(p: torch.Tensor, grad: torch.Tensor, state: dict, lr: float, momentum: float, wd: float,
                           beta2: float) -> None:
    """One step of ALL_OPTIONS on one matrix, written out in the documented order, in place on p and state."""
    rows, cols = p.shape
    buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
    buf.mul_(momentum).add_(grad, alpha=1 - momentum)
    update = grad + momentum * (buf - grad)  # Nesterov
    # Row equilibration: every row gets the matrix's root-mean-square row norm.
    update = update * (update.norm() / math.sqrt(rows) / update.norm(dim=1, keepdim=True))
    ortho = polar_express(update[None], steps=5, dtype=torch.float32)[0]
    ortho = ortho * (math.sqrt(min(rows, cols)) / ortho.norm())  # renormalise
    # NorMuon: EMA of the mean square along the longer side, rescale, restore the Frobenius norm.
    mean_sq = ortho.square().mean(dim=1 if rows >= cols else 0, keepdim=True)
    second = state.setdefault("second_moment", torch.zeros_like(mean_sq))
    second.mul_(beta2).add_(mean_sq, alpha=1 - beta2)
    rescaled = ortho / second.sqrt()
    ortho = rescaled * (ortho.norm() / rescaled.norm())
    # Cautious decay: only where the step moves the weight towards zero.
    decay = torch.where(ortho * p >= 0, 1 - lr * wd, 1.0)
    p.mul_(decay).sub_(ortho, alpha=lr * math.sqrt(max(1.0, rows / cols)))


def test_every_option_acts_in_the_step_in_the_documented_order() -> None:
    """Muon's step with every option on equals the rule written out by hand (a step that dropped an option,
    or applied one in another order or with another EMA rate, differs)."""
    torch.manual_seed(0)
    shapes = [(48, 16), (16, 48), (24, 24)]
    params = [torch.nn.Parameter(torch.randn(s) * torch.linspace(0.2, 2.0, s[1])) for s in shapes]
    reference = [p.detach().clone() for p in params]
    states: list[dict] = [{} for _ in shapes]
    opt = Muon(params, lr=0.05, momentum=0.9, weight_decay=0.5, ns_dtype=torch.float32, **vars(ALL_OPTIONS))
    for _ in range(3):
        before = [p.detach().clone() for p in params]
        for i, (p, s) in enumerate(zip(params, shapes)):
            g = torch.randn(s) * torch.linspace(0.1, 3.0, s[0])[:, None]  # rows of very different sizes
            p.grad = g
            reference_options_step(reference[i], g.clone(), states[i], 0.05, 0.9, 0.5, ALL_OPTIONS.normuon_beta2)
        opt.step()
        for p, b, r in zip(params, before, reference):
            torch.testing.assert_close(p.detach() - b, r - b, rtol=1e-4, atol=1e-6)
    for p, state in zip(params, states):
        for key in ("momentum_buffer", "second_moment"):
            torch.testing.assert_close(opt.state[p][key], state[key], rtol=1e-4, atol=1e-7)
