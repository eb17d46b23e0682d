"""Learning-rate and weight-decay schedules: pure functions of the step (the LR multiplier is logged
each step; Muon's momentum schedule is picochat.optim.muon_momentum)."""

from __future__ import annotations

import math


def warmup_constant_warmdown(step: int, num_iterations: int, warmup_steps: int = 0,
                             warmdown_ratio: float = 0.2, final_lr_frac: float = 0.0) -> float:
    """LR multiplier: linear warmup to 1, constant, then linear warmdown to `final_lr_frac`.

    The warmdown covers the last `warmdown_ratio` of the `num_iterations` steps.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    warmdown_steps = round(warmdown_ratio * num_iterations)
    if warmdown_steps <= 0 or step < num_iterations - warmdown_steps:
        return 1.0
    progress = (num_iterations - step) / warmdown_steps  # 1 -> 0 across the warmdown
    return progress * 1.0 + (1 - progress) * final_lr_frac


def constant_then_linear_to_zero(step: int, num_iterations: int, constant_frac: float = 0.8) -> float:
    """Mid-training: 1.0 for the first `constant_frac` of progress, then linear to 0."""
    progress = step / max(1, num_iterations)
    return 1.0 if progress < constant_frac else max(0.0, (1 - progress) / (1 - constant_frac))


def linear_to_zero(step: int, num_iterations: int, init_frac: float = 1.0) -> float:
    """SFT/RL: `init_frac` at step 0, linearly to 0 at the end."""
    return init_frac * max(0.0, 1 - step / max(1, num_iterations))


def cosine_to_zero(step: int, num_iterations: int) -> float:
    """Weight-decay multiplier: 1 at step 0, half a cosine down to 0 at `num_iterations`."""
    return 0.5 * (1 + math.cos(math.pi * step / max(1, num_iterations)))
