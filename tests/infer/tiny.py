"""Tiny tokenizers, models and checkpoints for inference and serving tests (seconds on a CPU)."""

from __future__ import annotations

from pathlib import Path

import torch

from picochat.model.gpt import GPTConfig, build_model
from picochat.tokenizer import Tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "Numbers like 12 and 345 add up: 12 + 345 = 357. " * 20,
    "Hello there! How are you today? I am fine, thank you. " * 20,
]


def tiny_tokenizer() -> Tokenizer:
    """A 300-token byte-level BPE learned from ASCII text: non-ASCII characters stay split into bytes."""
    return Tokenizer.train(TEXTS, vocab_size=300)


def tiny_model(vocab_size: int, seed: int = 0, sequence_len: int = 64, **options) -> torch.nn.Module:
    """A 2-layer GPT (GQA: 2 query heads, 1 kv head) with every weight random, so logits depend on
    context; `options`: other GPTConfig fields (the architecture options)."""
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, sequence_len=sequence_len,
                       **options)
    model = build_model(config, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def save_tiny_checkpoint(stage: str = "sft", tag: str = "tiny", sequence_len: int = 64) -> Path:
    """Write a tiny servable checkpoint under $PICOCHAT_HOME/checkpoints/<stage>/<tag>/step_1."""
    from picochat.checkpoint import run_dir, save_model_only

    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size, sequence_len=sequence_len)
    return save_model_only(run_dir(stage, tag), model, tok, {"step": 1, "stage": stage})
