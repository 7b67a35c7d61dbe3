"""The sampling policy: which frames to take and at what size (qwen-vl-utils semantics).

Pure logic, no I/O. The rules follow qwen-vl-utils' ``smart_nframes``, ``smart_resize`` and
``calculate_video_frame_range`` so that a clip sampled here gives the model what it saw in
training: a target ``fps`` (or a fixed ``nframes``), frame counts rounded to the temporal
factor 2 and clamped to ``[min_frames, max_frames]``, frame indices spread evenly with
``linspace(start, end, n).round()``, and each frame resized to multiples of 28 keeping the
aspect ratio, within per-frame pixel bounds and a pixel budget shared by all frames.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from captionflow.config import VideoSettings
from captionflow.errors import InvalidRequestError, VideoEmptyError

FRAME_FACTOR = 2
IMAGE_FACTOR = 28
MAX_ASPECT_RATIO = 200
OVERRIDE_KEYS = frozenset({"fps", "nframes", "min_frames", "max_frames", "min_pixels",
                           "max_pixels", "total_pixels", "start_s", "end_s"})


def round_by_factor(x: float, factor: int) -> int:
    return round(x / factor) * factor


def ceil_by_factor(x: float, factor: int) -> int:
    return math.ceil(x / factor) * factor


def floor_by_factor(x: float, factor: int) -> int:
    return math.floor(x / factor) * factor


@dataclass(frozen=True, slots=True)
class SamplingPolicy:
    """How to sample one video. Build it with :meth:`from_settings`."""

    fps: float = 2.0
    nframes: int | None = None
    min_frames: int = 4
    max_frames: int = 768
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    total_pixels: int = 24576 * 28 * 28
    start_s: float | None = None
    end_s: float | None = None

    @classmethod
    def from_settings(cls, settings: VideoSettings,
                      overrides: Mapping[str, Any] | None = None) -> SamplingPolicy:
        """The configured defaults with per-event ``overrides`` applied.

        Overrides are clamped to the configured limits: ``fps`` and ``nframes`` cannot ask
        for more frames than ``settings.max_frames``, pixel values cannot exceed the
        configured ``max_pixels``/``total_pixels`` nor go below ``min_pixels``. A value that
        can never work (negative, not a number, start after end, ``fps`` with ``nframes``,
        an unknown key) raises :class:`InvalidRequestError`.
        """
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        unknown = set(given) - OVERRIDE_KEYS
        if unknown:
            raise InvalidRequestError(
                f"unknown video sampling option(s) {sorted(unknown)}; "
                f"allowed: {sorted(OVERRIDE_KEYS)}")
        if "fps" in given and "nframes" in given:
            raise InvalidRequestError("give either fps or nframes for a video, not both")
        values: dict[str, Any] = {}
        for key, value in given.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or \
                    not math.isfinite(value):
                raise InvalidRequestError(f"video option {key}={value!r} must be a finite number")
            if value < 0 or (value == 0 and key not in ("start_s", "end_s")):
                raise InvalidRequestError(f"video option {key}={value!r} must be positive")
            values[key] = value
        for key in ("nframes", "min_frames", "max_frames", "min_pixels", "max_pixels",
                    "total_pixels"):
            if key in values:
                values[key] = int(values[key])
        policy = cls(
            fps=settings.fps, min_frames=settings.min_frames, max_frames=settings.max_frames,
            min_pixels=settings.min_pixels, max_pixels=settings.max_pixels,
            total_pixels=settings.total_pixels)
        policy = replace(policy, **values)
        # Clamp to the configured limits: an event may ask for less, never for more.
        max_frames = min(policy.max_frames, settings.max_frames)
        min_frames = min(max(policy.min_frames, 1), max_frames)
        max_pixels = min(max(policy.max_pixels, settings.min_pixels), settings.max_pixels)
        min_pixels = min(max(policy.min_pixels, settings.min_pixels), max_pixels)
        total_pixels = min(policy.total_pixels, settings.total_pixels)
        nframes = policy.nframes
        if nframes is not None:
            nframes = max(FRAME_FACTOR, min(nframes, floor_by_factor(max_frames, FRAME_FACTOR)))
        if policy.start_s is not None and policy.end_s is not None and \
                policy.start_s >= policy.end_s:
            raise InvalidRequestError(
                f"video start_s={policy.start_s} must be before end_s={policy.end_s}")
        return replace(policy, nframes=nframes, min_frames=min_frames, max_frames=max_frames,
                       min_pixels=min_pixels, max_pixels=max_pixels, total_pixels=total_pixels)

    def frame_range(self, total_frames: int, video_fps: float) -> tuple[int, int]:
        """First and last source frame index inside ``[start_s, end_s]`` (inclusive)."""
        if total_frames <= 0:
            raise VideoEmptyError("the video has no decodable frames")
        if (self.start_s is None and self.end_s is None) or total_frames == 1:
            return 0, total_frames - 1  # a still image has no time to cut
        max_duration_s = total_frames / video_fps
        start = 0
        end = total_frames - 1
        if self.start_s is not None:
            start = math.ceil(max(0.0, min(self.start_s, max_duration_s)) * video_fps)
        if self.end_s is not None:
            end = min(math.floor(max(0.0, min(self.end_s, max_duration_s)) * video_fps),
                      total_frames - 1)
        if start > end or start >= total_frames:
            raise InvalidRequestError(
                f"video range start_s={self.start_s} end_s={self.end_s} holds no frame of a "
                f"{max_duration_s:.2f} s video; pick times inside the video")
        return start, end

    def frame_count(self, range_frames: int, video_fps: float) -> int:
        """How many frames to sample from ``range_frames`` source frames (even, >= 2).

        A range shorter than two frames (a still image) still yields two: the one frame is
        repeated, as Qwen2.5-VL's processor does for images.
        """
        if range_frames < FRAME_FACTOR:
            return FRAME_FACTOR
        if self.nframes is not None:
            n = round_by_factor(self.nframes, FRAME_FACTOR)
        else:
            min_frames = ceil_by_factor(self.min_frames, FRAME_FACTOR)
            max_frames = floor_by_factor(min(self.max_frames, range_frames), FRAME_FACTOR)
            wanted = range_frames / video_fps * self.fps
            n = floor_by_factor(min(max(wanted, min_frames), max_frames, range_frames),
                                FRAME_FACTOR)
        return max(FRAME_FACTOR, min(n, floor_by_factor(range_frames, FRAME_FACTOR)))

    def frame_indices(self, total_frames: int, video_fps: float) -> tuple[list[int], float]:
        """The source frame indices to sample and the rate they were sampled at."""
        start, end = self.frame_range(total_frames, video_fps)
        range_frames = end - start + 1
        n = self.frame_count(range_frames, video_fps)
        indices = np.linspace(start, end, n).round().astype(int).tolist()
        sample_fps = n / max(range_frames, 1e-6) * video_fps
        return indices, sample_fps

    def frame_size(self, height: int, width: int, nframes: int) -> tuple[int, int]:
        """Output ``(height, width)``: multiples of 28, aspect kept, within the pixel budget."""
        max_pixels = max(min(self.max_pixels, self.total_pixels / nframes * FRAME_FACTOR),
                         int(self.min_pixels * 1.05))
        return smart_resize(height, width, min_pixels=self.min_pixels, max_pixels=max_pixels)


def smart_resize(height: int, width: int, *, factor: int = IMAGE_FACTOR,
                 min_pixels: float, max_pixels: float) -> tuple[int, int]:
    """qwen-vl-utils' ``smart_resize``: the closest multiple-of-``factor`` size within
    ``[min_pixels, max_pixels]`` keeping the aspect ratio."""
    if height <= 0 or width <= 0:
        raise InvalidRequestError(f"video frame size {width}x{height} is not a picture")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise InvalidRequestError(
            f"video aspect ratio {width}x{height} exceeds {MAX_ASPECT_RATIO}:1; the model "
            "cannot take it")
    h_bar = max(factor, round_by_factor(height, factor))
    w_bar = max(factor, round_by_factor(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, floor_by_factor(height / beta, factor))
        w_bar = max(factor, floor_by_factor(width / beta, factor))
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = ceil_by_factor(height * beta, factor)
        w_bar = ceil_by_factor(width * beta, factor)
    # A short side raised to ``factor`` can push a very wide frame past the model's aspect
    # limit, and the model's processor refuses such a video: shorten the long side.
    longest = floor_by_factor(MAX_ASPECT_RATIO * min(h_bar, w_bar), factor)
    return min(h_bar, longest), min(w_bar, longest)
