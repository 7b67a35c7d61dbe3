"""Caption one VideoEvent: frames, then one request per clip, then the joined result.

The single implementation behind both the worker (``consumer/pipeline.py``) and batch mode
(``batch/runner.py``), including the retry rule for retriable errors.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from captionflow.config import Settings, WorkerSettings
from captionflow.errors import CaptionflowError, ErrorCode, EventError, InvalidRequestError
from captionflow.schemas.events import VideoEvent
from captionflow.serving.base import CaptionRequest, CaptionResult
from captionflow.video.clip import Clip
from captionflow.video.images import load_images

log = logging.getLogger(__name__)
T = TypeVar("T")

ClipsFn = Callable[[str, Mapping[str, Any]], Awaitable[list[Clip]]]
CaptionFn = Callable[[CaptionRequest], Awaitable[CaptionResult]]


class Attempts:
    """Retriable errors are tried again with exponential backoff, up to
    ``worker.max_attempts`` attempts per event in all; ``count`` is the attempt in progress."""

    def __init__(self, worker: WorkerSettings, *, label: str = "",
                 on_retry: Callable[[EventError], None] | None = None) -> None:
        self._w = worker
        self._label = label
        self._on_retry = on_retry
        self.count = 1

    async def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        while True:
            try:
                return await fn()
            except EventError as e:
                if not e.retriable or self.count >= self._w.max_attempts:
                    raise
                backoff_ms = min(self._w.retry_backoff_max_ms,
                                 self._w.retry_backoff_ms * 2 ** (self.count - 1))
                log.info("%s: attempt %d failed (%s); retrying in %d ms", self._label,
                         self.count, e, backoff_ms)
                if self._on_retry is not None:
                    self._on_retry(e)
                self.count += 1
                await asyncio.sleep(backoff_ms / 1000)


@dataclass(frozen=True, slots=True)
class EventCaption:
    text: str
    prompt: str
    finish_reason: str
    clips: list[Clip]
    results: list[CaptionResult]
    fetch_decode_s: float
    caption_s: float

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.results)

    @property
    def completion_tokens(self) -> int:
        return sum(r.completion_tokens for r in self.results)

    @property
    def frames_sampled(self) -> int:
        return sum(c.num_frames for c in self.clips)

    @property
    def windowed(self) -> bool:
        return len(self.clips) > 1 or self.clips[0].window_index is not None


_images_off_logged = False


async def event_images(event: VideoEvent, settings: Settings,
                       attempts: Attempts) -> tuple[np.ndarray, ...]:
    """The event's ``image`` references, loaded for the model (fetched like videos, off the
    event loop), or nothing when ``serving.limit_mm_per_prompt["image"]`` is 0: then the
    images are only carried through to the caption event, as before images reached the
    model. More images than that limit fail the event with ``invalid_request``."""
    global _images_off_logged
    refs = event.image or []
    if not refs:
        return ()
    limit = int(settings.serving.limit_mm_per_prompt.get("image", 0))
    if limit <= 0:
        if not _images_off_logged:
            _images_off_logged = True
            log.warning("event %s has %d image(s); serving.limit_mm_per_prompt allows 0 images "
                        "per prompt, so images are carried through, not sent to the model "
                        "(set e.g. CAPTIONFLOW_SERVING__LIMIT_MM_PER_PROMPT="
                        "'{\"image\": 4, \"video\": 1}' to send them); logged once",
                        event.id, len(refs))
        return ()
    if len(refs) > limit:
        raise InvalidRequestError(
            f"the event has {len(refs)} images but serving.limit_mm_per_prompt allows "
            f"{limit} per prompt; send fewer images or raise the limit")

    async def load() -> tuple[np.ndarray, ...]:
        try:
            return await asyncio.to_thread(load_images, refs, settings.video)
        except CaptionflowError:
            raise
        except Exception as e:
            # A bug or an unforeseen library error fails this event, not the worker.
            raise EventError(f"loading images {refs!r} failed unexpectedly: {e!r}",
                             code=ErrorCode.INTERNAL) from e
    return await attempts.run(load)


def window_end_s(clip: Clip) -> float:
    return clip.end_s if clip.end_s is not None else clip.facts.duration_s


async def caption_event(event: VideoEvent, *, clips: ClipsFn, caption: CaptionFn,
                        settings: Settings, attempts: Attempts) -> EventCaption:
    """Raises ``EventError`` subclasses for this event alone and ``FatalError`` when the
    backend is gone; ``attempts.count`` tells how many attempts were made either way."""
    options = event.options
    overrides = options.frame_overrides() if options else {}
    started = time.monotonic()
    images = await event_images(event, settings, attempts)
    got = await attempts.run(lambda: clips(event.reference, overrides))
    fetch_decode_s = time.monotonic() - started
    prompt = event.prompt(settings.serving.default_prompt)
    sampling = options.sampling.model_dump(exclude_none=True) \
        if options and options.sampling else {}

    async def one(clip: Clip) -> CaptionResult:
        def attempt() -> Awaitable[CaptionResult]:
            # Unique per attempt: a result can only ever reach the request that asked.
            request_id = f"{event.id}#w{clip.window_index or 0}#a{attempts.count}" \
                         f"-{uuid.uuid4().hex[:8]}"
            return caption(CaptionRequest(request_id, clip, prompt, sampling, images))
        return await attempts.run(attempt)

    started = time.monotonic()
    results = list(await asyncio.gather(*(one(c) for c in got)))
    caption_s = time.monotonic() - started
    if len(got) == 1 and got[0].window_index is None:
        text, finish = results[0].text, results[0].finish_reason
    else:
        text = "\n".join(f"[{c.start_s:.1f}s-{window_end_s(c):.1f}s] {r.text}"
                         for c, r in zip(got, results, strict=True))
        finish = "length" if any(r.finish_reason == "length" for r in results) else "stop"
    return EventCaption(text=text, prompt=prompt, finish_reason=finish, clips=got,
                        results=results, fetch_decode_s=fetch_decode_s, caption_s=caption_s)
