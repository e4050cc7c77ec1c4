"""Inference backends. `make_backend(kind, model, **options)` imports the chosen one lazily, so the
transformers / vLLM modules (and torch) are only loaded when used.

kinds: "transformers" (`hf.TransformersBackend`), "vllm" (`vllm_offline.VLLMBackend`), "http"
(`http.OpenAIHTTPBackend`, needs `base_url` in options).
"""

from __future__ import annotations

from typing import Any

from idiomreason.backends.base import Backend, Generation

BACKENDS = ("transformers", "vllm", "http")


def make_backend(kind: str, model: Any, **options: Any) -> Backend:
    """Build a backend. `options` are the backend class's keyword arguments."""
    if kind == "transformers":
        from idiomreason.backends.hf import TransformersBackend

        return TransformersBackend(model, **options)
    if kind == "vllm":
        from idiomreason.backends.vllm_offline import VLLMBackend

        return VLLMBackend(model, **options)
    if kind == "http":
        from idiomreason.backends.http import OpenAIHTTPBackend

        if "base_url" not in options:
            raise ValueError("the http backend needs options['base_url'] (e.g. 'http://127.0.0.1:8000/v1')")
        return OpenAIHTTPBackend(model=model, **options)
    raise ValueError(f"backend kind must be one of {BACKENDS}, got {kind!r}")


__all__ = ["BACKENDS", "Backend", "Generation", "make_backend"]
