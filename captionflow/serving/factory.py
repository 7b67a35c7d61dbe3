"""Pick the backend named by ``serving.backend``."""

from __future__ import annotations

from captionflow.config import ServingSettings
from captionflow.serving.base import CaptionBackend


def make_backend(settings: ServingSettings) -> CaptionBackend:
    """A not-yet-started backend; heavy imports (vLLM, torch) happen in ``start()``."""
    if settings.backend == "vllm":
        from captionflow.serving.vllm_engine import VllmBackend
        return VllmBackend(settings)
    if settings.backend == "openai":
        from captionflow.serving.openai_client import OpenAIBackend
        return OpenAIBackend(settings)
    if settings.backend == "transformers":
        from captionflow.serving.hf_transformers import TransformersBackend
        return TransformersBackend(settings)
    raise ValueError(f"unknown serving.backend {settings.backend!r}")  # pragma: no cover
