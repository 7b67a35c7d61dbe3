"""Event models and their JSON encoding."""

from captionflow.schemas.codec import (
    dead_letter,
    decode_caption_event,
    decode_dead_letter_event,
    decode_video_event,
    encode,
)
from captionflow.schemas.events import (
    SCHEMA_VERSION,
    CaptionEvent,
    DeadLetterEvent,
    ErrorInfo,
    EventOptions,
    SamplingOptions,
    SourceCoordinates,
    StageTimings,
    TokenUsage,
    Turn,
    VideoEvent,
    VideoInfo,
    WindowCaption,
)

__all__ = [
    "SCHEMA_VERSION", "CaptionEvent", "DeadLetterEvent", "ErrorInfo", "EventOptions",
    "SamplingOptions", "SourceCoordinates", "StageTimings", "TokenUsage", "Turn", "VideoEvent",
    "VideoInfo", "WindowCaption", "dead_letter", "decode_caption_event",
    "decode_dead_letter_event", "decode_video_event", "encode",
]
