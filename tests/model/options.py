"""Tiny configs with the architecture options, alone and all together, for the model, decode and
batching tests, and a way to give the options' parameters values that matter."""

from __future__ import annotations

import torch

from picochat.model.gpt import ARCH_2026, GPT, GPTConfig

# name -> GPTConfig fields
OPTIONS = {
    "value_embeds": {"value_embeds": True},
    "layer_lambdas": {"layer_lambdas": True},
    "smear": {"smear": True},
    "backout": {"backout": True},
    "windows": {"window_pattern": "SL"},
    "qk_scale": {"qk_scale": 1.3},
    "init_2026": {"init": "2026"},
    "all_2026": ARCH_2026,
}
# A windowed config has sequence_len 256, so its short window is 128 keys back: sequences of LONG
# tokens reach past it.
LONG = 160


def options_config(options: dict, n_kv_head: int = 2, **sizes) -> GPTConfig:
    """A 3-layer, width-64 GPT (4 query heads) with `options`; sequence_len 256 when windowed, else 32."""
    windowed = "S" in options.get("window_pattern", "L")
    base = {"vocab_size": 97, "n_layer": 3, "n_head": 4, "n_kv_head": n_kv_head, "n_embd": 64,
            "sequence_len": 256 if windowed else 32}
    return GPTConfig(**{**base, **sizes, **options})


def is_option_param(name: str) -> bool:
    """A parameter that only an architecture option adds."""
    return name.startswith("value_embeds.") or name.endswith(("_lambdas", "_lambda", "_gate"))


@torch.no_grad()
def randomize(model: GPT, seed: int = 1) -> GPT:
    """Non-zero output projections (every layer matters), the same in models with and without
    options, then option parameters in [0.2, 1) (smear's lambda starts at 0 and the lambdas
    neutral: they would change nothing)."""
    g = torch.Generator().manual_seed(seed)
    params = list(model.named_parameters())
    for name, p in params:
        if name.endswith("c_proj.weight"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    for name, p in params:
        if is_option_param(name):
            p.copy_(0.2 + 0.8 * torch.rand(p.shape, generator=g))
    return model
