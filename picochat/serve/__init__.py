"""Serving: a FastAPI app with the web chat page and an OpenAI-compatible API (`picochat serve`)."""
