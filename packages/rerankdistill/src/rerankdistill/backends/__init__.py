"""Teacher/student generation backends: OpenAI-compatible HTTP (core), transformers and vLLM (imported
lazily)."""

from rerankdistill.backends.openai_http import OpenAIChatBackend

__all__ = ["OpenAIChatBackend"]
