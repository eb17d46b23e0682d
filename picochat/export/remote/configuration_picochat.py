"""The configuration of a picochat GPT exported as transformers remote code (modeling_picochat.py).

Its fields are picochat's GPTConfig fields under their own names, plus the per-layer layout the
exporter derives from them: `window_sizes` (per layer, how many earlier tokens a query sees besides
itself; null: all of them) and `value_embed_layers` (the layers with a value embedding).
"""

from __future__ import annotations

from typing import ClassVar

from transformers import PretrainedConfig

# Field -> default: the classic architecture.
DEFAULTS = {"vocab_size": 32768, "n_layer": 12, "n_head": 6, "n_kv_head": 6, "n_embd": 768, "sequence_len": 2048,
            "softcap": 15.0, "rope_theta": 10000.0, "norm_eps": 1e-6, "mlp_ratio": 4, "value_embeds": False,
            "layer_lambdas": False, "smear": False, "backout": False, "window_pattern": "L", "qk_scale": 1.0,
            "init": "classic", "window_sizes": None, "value_embed_layers": []}


class PicochatConfig(PretrainedConfig):
    model_type = "picochat"
    attribute_map: ClassVar[dict[str, str]] = {
        "hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
        "num_key_value_heads": "n_kv_head", "max_position_embeddings": "sequence_len"}

    def __init__(self, **kwargs) -> None:
        for name, default in DEFAULTS.items():
            setattr(self, name, kwargs.pop(name, default))
        if self.window_sizes is None:
            self.window_sizes = [None] * self.n_layer
        if len(self.window_sizes) != self.n_layer:
            raise ValueError(f"window_sizes has {len(self.window_sizes)} entries for n_layer={self.n_layer}")
        if self.value_embeds != bool(self.value_embed_layers):
            raise ValueError("value_embeds and value_embed_layers disagree: list the layers when it is on")
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head
