"""Tokenizer: BPE training, tiktoken-backed encoding, special tokens and chat rendering."""

from picochat.tokenizer.bpe import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer
from picochat.tokenizer.chat import ConversationError, render_conversation, render_for_completion

__all__ = ["SPECIAL_TOKENS", "SPLIT_PATTERN", "ConversationError", "Tokenizer", "render_conversation",
           "render_for_completion"]
