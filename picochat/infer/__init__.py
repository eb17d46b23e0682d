"""Inference: the KV-cache Engine (sampling, tool use, streaming) and the calculator tool."""

from picochat.infer.calculator import calculator
from picochat.infer.engine import Engine

__all__ = ["Engine", "calculator"]
