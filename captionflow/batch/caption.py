"""Caption one VideoEvent with the worker's own parts: ``FrameSource`` for the frames and a
``CaptionBackend`` for the model, with the worker's retry rule for retriable errors."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from captionflow.config import Settings
from captionflow.errors import EventError
from captionflow.schemas.events import VideoEvent
from captionflow.serving.base import CaptionBackend, CaptionRequest, CaptionResult
from captionflow.video.clip import Clip
from captionflow.video.source import FrameSource

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class EventCaption:
    text: str
    prompt: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    frames_sampled: int


async def caption_event(event: VideoEvent, *, frames: FrameSource,
                        caption: Callable[[CaptionRequest], Awaitable[CaptionResult]],
                        settings: Settings) -> EventCaption:
    """Frames, then one request per clip (one per window when ``video.window_s`` is set),
    joined the way the worker joins window captions. Raises ``EventError`` subclasses for
    this event alone and ``FatalError`` when the backend is gone."""
    options = event.options
    overrides = options.frame_overrides() if options else {}
    attempts = _Attempts(settings)
    clips = await attempts.run(lambda: frames.clips(event.reference, overrides), event.id)
    prompt = event.prompt(settings.serving.default_prompt)
    sampling = options.sampling.model_dump(exclude_none=True) \
        if options and options.sampling else {}

    async def one(clip: Clip) -> CaptionResult:
        def attempt() -> Awaitable[CaptionResult]:
            # Unique per attempt: a result can only ever reach the request that asked.
            request_id = f"{event.id}#w{clip.window_index or 0}-{uuid.uuid4().hex[:8]}"
            return caption(CaptionRequest(request_id, clip, prompt, sampling))
        return await attempts.run(attempt, event.id)

    results = await asyncio.gather(*(one(c) for c in clips))
    if len(clips) == 1 and clips[0].window_index is None:
        text, finish = results[0].text, results[0].finish_reason
    else:
        text = "\n".join(
            f"[{c.start_s:.1f}s-{(c.end_s if c.end_s is not None else c.facts.duration_s):.1f}s]"
            f" {r.text}" for c, r in zip(clips, results, strict=True))
        finish = "length" if any(r.finish_reason == "length" for r in results) else "stop"
    return EventCaption(
        text=text, prompt=prompt, finish_reason=finish,
        prompt_tokens=sum(r.prompt_tokens for r in results),
        completion_tokens=sum(r.completion_tokens for r in results),
        frames_sampled=sum(c.num_frames for c in clips))


class _Attempts:
    """The worker's rule: retriable errors are tried again with exponential backoff, up to
    ``worker.max_attempts`` attempts per event in all."""

    def __init__(self, settings: Settings) -> None:
        self._w = settings.worker
        self.count = 1

    async def run(self, fn: Callable[[], Awaitable[T]], event_id: str) -> T:
        while True:
            try:
                return await fn()
            except EventError as e:
                if not e.retriable or self.count >= self._w.max_attempts:
                    raise
                backoff_ms = min(self._w.retry_backoff_max_ms,
                                 self._w.retry_backoff_ms * 2 ** (self.count - 1))
                log.info("%s: attempt %d failed (%s); retrying in %d ms", event_id,
                         self.count, e, backoff_ms)
                self.count += 1
                await asyncio.sleep(backoff_ms / 1000)
