"""The decode stage's front door: a reference in, sampled clips out.

``load_clips`` does the work synchronously (batch mode, tests, the transformers backend);
``FrameSource`` runs the same function in a bounded thread pool so the event loop never
waits on a video. Threads suffice because PyAV releases the GIL while demuxing, decoding
and scaling (docs/video.md has the measurement).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from captionflow.config import VideoSettings
from captionflow.errors import (
    CaptionflowError,
    ErrorCode,
    EventError,
    InternalError,
    InvalidRequestError,
)
from captionflow.video.clip import Clip
from captionflow.video.decode import VideoIndex, decode_frames, probe
from captionflow.video.fetch import LocalVideo, fetch
from captionflow.video.sampling import SamplingPolicy
from captionflow.video.windows import plan_windows


def load_clips(reference: str, settings: VideoSettings,
               overrides: Mapping[str, Any] | None = None) -> list[Clip]:
    """Fetch ``reference`` and sample it: one :class:`Clip`, or one per window when
    ``settings.window_s`` is set. Raises :class:`captionflow.errors.EventError` subclasses."""
    policy = SamplingPolicy.from_settings(settings, overrides)
    started = time.monotonic()
    video = fetch(reference, settings)
    fetch_s = time.monotonic() - started
    try:
        clips = _sample(video, policy, settings)
    finally:
        video.release()
    for clip in clips:
        clip.extra["fetch_s"] = fetch_s  # the decode stage's metrics split fetch from decode
    return clips


def _sample(video: LocalVideo, policy: SamplingPolicy, settings: VideoSettings) -> list[Clip]:
    index = probe(video.path, max_duration_s=settings.max_duration_s)
    if not settings.window_s:
        return [_clip(video, index, policy, settings, window_index=None)]
    facts = index.facts
    start_s = policy.start_s or 0.0
    end_s = min(policy.end_s if policy.end_s is not None else facts.duration_s,
                facts.duration_s)
    if end_s <= start_s:
        raise InvalidRequestError(
            f"video range start_s={start_s} end_s={end_s} is empty for a "
            f"{facts.duration_s:.2f} s video")
    windows = plan_windows(start_s, end_s, window_s=settings.window_s,
                           overlap_s=settings.window_overlap_s,
                           min_remainder_s=settings.window_min_remainder_s)
    return [_clip(video, index, dataclasses.replace(policy, start_s=w.start_s, end_s=w.end_s),
                  settings, window_index=w.index)
            for w in windows]


def _clip(video: LocalVideo, index: VideoIndex, policy: SamplingPolicy,
          settings: VideoSettings, *, window_index: int | None) -> Clip:
    facts = index.facts
    indices, sample_fps = policy.frame_indices(facts.total_frames, facts.source_fps)
    height, width = policy.frame_size(facts.height, facts.width, len(indices))
    frames, stats = decode_frames(video.path, index, indices, height=height, width=width,
                                  threads=settings.decode_threads)
    if stats.rotation_deg != facts.rotation_deg:
        facts = dataclasses.replace(facts, rotation_deg=stats.rotation_deg)
    if facts.total_frames < 2:
        # A still image repeated to the model's temporal factor: the sampling rate is the
        # policy's, the frame's own rate says nothing.
        sample_fps = policy.fps
    return Clip(
        frames=frames,
        frame_indices=tuple(indices),
        timestamps_s=tuple(index.timestamp_s(i) for i in indices),
        sample_fps=round(sample_fps, 6),
        facts=facts,
        start_s=policy.start_s or 0.0,
        end_s=policy.end_s if policy.end_s is not None else facts.duration_s,
        window_index=window_index,
        extra={"seeks": stats.seeks, "packets_decoded": stats.packets_decoded,
               "frames_decoded": stats.frames_decoded, "decode_errors": stats.decode_errors,
               "linear_fallback": stats.linear_fallback},
    )


class FrameSource:
    """Async facade over :func:`load_clips` with at most ``settings.decode_workers``
    decodes at a time."""

    def __init__(self, settings: VideoSettings) -> None:
        self._settings = settings
        self._pool = ThreadPoolExecutor(max_workers=settings.decode_workers,
                                        thread_name_prefix="captionflow-decode")
        self._closed = False

    async def clips(self, reference: str,
                    overrides: Mapping[str, Any] | None = None) -> list[Clip]:
        if self._closed:
            raise InternalError("FrameSource.clips() called after close()")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._pool, load_clips, reference, self._settings, overrides)
        except CaptionflowError:
            raise
        except Exception as e:
            # A bug or an unforeseen library error fails this event, not the worker.
            raise EventError(f"decoding {reference!r} failed unexpectedly: {e!r}",
                             code=ErrorCode.INTERNAL) from e

    async def close(self) -> None:
        """Wait for running decodes, then stop the pool."""
        if self._closed:
            return
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: self._pool.shutdown(wait=True, cancel_futures=True))

    async def __aenter__(self) -> FrameSource:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
