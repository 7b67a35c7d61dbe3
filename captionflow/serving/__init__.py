"""Captioning backends behind one interface (:class:`CaptionBackend`)."""

from captionflow.serving.base import (
    SAMPLING_KEYS,
    CaptionBackend,
    CaptionRequest,
    CaptionResult,
)
from captionflow.serving.engine_setup import (
    check_engine_limits,
    cpu_engine_overrides,
    prepare_vllm_environment,
    tiny_cpu_settings,
)
from captionflow.serving.factory import make_backend
from captionflow.serving.hf_transformers import TransformersBackend
from captionflow.serving.openai_client import OpenAIBackend
from captionflow.serving.prompt import build_messages, render_prompt, user_text, video_metadata
from captionflow.serving.tiny_model import TINY_MODEL_DIRNAME, build_tiny_model
from captionflow.serving.vllm_engine import VllmBackend

__all__ = [
    "SAMPLING_KEYS", "CaptionBackend", "CaptionRequest", "CaptionResult", "OpenAIBackend",
    "TINY_MODEL_DIRNAME", "TransformersBackend", "VllmBackend", "build_messages",
    "build_tiny_model", "check_engine_limits", "cpu_engine_overrides", "make_backend",
    "prepare_vllm_environment", "render_prompt", "tiny_cpu_settings", "user_text",
    "video_metadata",
]
