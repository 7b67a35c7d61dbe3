"""The frames stage: fetch and probe once per event, decode windows on demand (a bounded
few at a time, see ``captioning.caption_event``), with the fetch and decode stages timed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from captionflow.metrics import Metrics
from captionflow.video.clip import Clip, ClipStream
from captionflow.video.source import FrameSource


def timed_clips(frames: FrameSource, metrics: Metrics,
                ) -> Callable[[str, Mapping[str, Any]], Awaitable[ClipStream]]:
    decode = metrics.stage_seconds.labels("decode")

    async def clips(reference: str, overrides: Mapping[str, Any]) -> ClipStream:
        stream = await frames.open(reference, dict(overrides))
        metrics.stage_seconds.labels("fetch").observe(stream.fetch_s)
        decode.observe(stream.probe_s)
        return _TimedStream(stream, decode.observe, metrics)
    return clips


class _TimedStream:
    """A :class:`ClipStream` that reports each window's decode time."""

    def __init__(self, stream: ClipStream, observe: Callable[[float], None],
                 metrics: Metrics) -> None:
        self._stream = stream
        self._observe = observe
        self._metrics = metrics

    @property
    def count(self) -> int:
        return self._stream.count

    @property
    def fetch_decode_s(self) -> float:
        return self._stream.fetch_decode_s

    async def clip(self, index: int) -> Clip:
        clip = await self._stream.clip(index)
        self._observe(float(clip.extra.get("decode_s", 0.0)))
        if clip.extra.get("device_fallback"):
            self._metrics.decode_device_fallbacks.labels(clip.extra["device_fallback"]).inc()
        return clip

    # The caption cache tells clips apart before decoding them (captioning.caption_event).
    async def content_validator(self) -> str | None:
        return await self._stream.content_validator()  # type: ignore[attr-defined]

    def clip_identity(self, index: int) -> dict[str, Any]:
        return self._stream.clip_identity(index)  # type: ignore[attr-defined]

    def planned_clip(self, index: int) -> Clip:
        return self._stream.planned_clip(index)  # type: ignore[attr-defined]

    async def aclose(self) -> None:
        await self._stream.aclose()
