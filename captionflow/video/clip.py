"""What the decode stage hands to serving: sampled frames plus the facts about them."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

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

    def without_frames(self) -> Clip:
        """This clip with its pixels let go: ``frames`` becomes a read-only zero-stride
        array of the same shape and dtype (one byte of memory), so sizes still read right
        once the model is done with the frames."""
        empty = np.lib.stride_tricks.as_strided(np.zeros(1, self.frames.dtype),
                                                shape=self.frames.shape,
                                                strides=(0,) * self.frames.ndim,
                                                writeable=False)
        return dataclasses.replace(self, frames=empty)

    def vllm_metadata(self) -> dict[str, Any]:
        """The metadata vLLM's Qwen2.5-VL path needs beside the frames (vLLM 0.32).

        The clip is described in its own frame numbering so that the processor's
        ``sampled_fps = len(frames_indices) / total_num_frames * fps`` is exactly
        ``sample_fps``: Qwen2.5-VL's temporal position ids use ``second_per_grid_ts =
        temporal_patch_size / sampled_fps``, and the source's frame count would shrink that
        rate for a window of a long video. The source facts travel in ``facts``.
        """
        if self.sample_fps <= 0:
            raise ValueError(f"Clip.sample_fps must be positive, got {self.sample_fps}")
        n = self.num_frames
        return {
            "fps": float(self.sample_fps),
            "duration": n / float(self.sample_fps),
            "total_num_frames": n,
            "frames_indices": list(range(n)),
            "video_backend": "pyav",
            "do_sample_frames": False,
        }


@runtime_checkable
class ClipStream(Protocol):
    """The clips of one video, decoded one at a time on demand (long videos: windows).

    ``count`` clips; ``await clip(i)`` decodes clip ``i``; ``fetch_decode_s`` is the time
    spent fetching, probing and decoding so far; ``aclose()`` releases the source."""

    @property
    def count(self) -> int: ...

    @property
    def fetch_decode_s(self) -> float: ...

    async def clip(self, index: int) -> Clip: ...

    async def aclose(self) -> None: ...


class ClipList:
    """A :class:`ClipStream` over clips already decoded."""

    def __init__(self, clips: Sequence[Clip], fetch_decode_s: float = 0.0) -> None:
        self._clips = list(clips)
        self._fetch_decode_s = fetch_decode_s

    @property
    def count(self) -> int:
        return len(self._clips)

    @property
    def fetch_decode_s(self) -> float:
        return self._fetch_decode_s

    async def clip(self, index: int) -> Clip:
        return self._clips[index]

    async def aclose(self) -> None:
        self._clips.clear()
