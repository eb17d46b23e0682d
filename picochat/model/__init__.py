"""The GPT model: config from depth, explicit init, FLOP counts, and the KV cache for decoding."""

from picochat.model.gpt import GPT, GPTConfig, build_model
from picochat.model.kv_cache import KVCache

__all__ = ["GPT", "GPTConfig", "KVCache", "build_model"]
