"""The tiny random-weight Qwen2.5-VL checkpoint (built by the package, so the demo can too)."""

from captionflow.serving.tiny_model import (
    QWEN2_VL_CHAT_TEMPLATE,
    QWEN_SPECIAL_TOKENS,
    TINY_MAX_POSITION_EMBEDDINGS,
    TINY_MODEL_DIRNAME,
    build_tiny_model,
)
