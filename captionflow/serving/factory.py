"""Pick the backend named by ``serving.backend``."""

from __future__ import annotations

from captionflow.config import ServingSettings, VideoSettings
from captionflow.serving.base import CaptionBackend


def make_backend(settings: ServingSettings, video: VideoSettings | None = None
                 ) -> CaptionBackend:
    """A not-yet-started backend; heavy imports (vLLM, torch) happen in ``start()``.
    ``video`` holds the sampling budgets an in-process engine is sized for."""
    if settings.backend == "vllm":
        from captionflow.serving.vllm_engine import VllmBackend
        return VllmBackend(settings, video)
    if settings.backend == "openai":
        from captionflow.serving.openai_client import OpenAIBackend
        return OpenAIBackend(settings)
    if settings.backend == "transformers":
        from captionflow.serving.hf_transformers import TransformersBackend
        return TransformersBackend(settings)
    raise ValueError(f"unknown serving.backend {settings.backend!r}")  # pragma: no cover
