"""picochat: build your own ChatGPT-style model from nothing, in Python."""

__version__ = "0.1.0"
