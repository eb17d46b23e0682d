"""Checkpoints in other frameworks' formats (`picochat export`): Hugging Face transformers for now."""
