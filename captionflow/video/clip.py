"""What the decode stage hands to serving: sampled frames plus the facts about them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class VideoFacts:
    """Facts about the source video, carried into the caption event."""

    duration_s: float
    source_fps: float
    total_frames: int
    width: int
    height: int
    codec: str
    rotation_deg: int = 0
    size_bytes: int | None = None


@dataclass(frozen=True, slots=True, eq=False)
class Clip:
    """Frames sampled from one video (or one window of it), ready for the model.

    ``frames`` is uint8 ``(T, H, W, 3)`` RGB; ``frame_indices`` and ``timestamps_s`` give,
    for each row of ``frames``, the source frame number and its presentation time.
    ``sample_fps`` is the rate the frames were sampled at (what Qwen2.5-VL's temporal
    position ids must be told).
    """

    frames: np.ndarray
    frame_indices: tuple[int, ...]
    timestamps_s: tuple[float, ...]
    sample_fps: float
    facts: VideoFacts
    start_s: float = 0.0
    end_s: float | None = None
    window_index: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    def vllm_metadata(self) -> dict[str, Any]:
        """The metadata vLLM's Qwen2.5-VL path needs beside the frames (FACTS: vLLM 0.32)."""
        return {
            "fps": self.facts.source_fps,
            "duration": self.facts.duration_s,
            "total_num_frames": self.facts.total_frames,
            "frames_indices": list(self.frame_indices),
            "video_backend": "pyav",
            "do_sample_frames": False,
        }
