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
from captionflow.errors import (
    CaptionflowError,
    DependencyError,
    ErrorCode,
    EventError,
    FatalError,
    InvalidRequestError,
)
from captionflow.schemas.events import VideoEvent
from captionflow.serving.base import CaptionRequest, CaptionResult
from captionflow.video.clip import Clip, ClipList, ClipStream
from captionflow.video.images import load_images

log = logging.getLogger(__name__)
T = TypeVar("T")

# Either every clip decoded, or a stream that decodes windows on demand (FrameSource.open).
ClipsFn = Callable[[str, Mapping[str, Any]], Awaitable["list[Clip] | ClipStream"]]
CaptionFn = Callable[[CaptionRequest], Awaitable[CaptionResult]]


class Attempts:
    """Retriable errors are tried again with exponential backoff, up to
    ``worker.max_attempts`` attempts per event in all; ``count`` is the attempt in progress.

    A dependency error (engine, broker or object store down) goes to ``on_dependency``,
    which waits until the dependency answers and returns whether it answered at once. Only
    then does the failure count as an attempt: a record is never charged for an outage, and
    one that fails while its dependency is fine still ends after ``max_attempts``. Without
    ``on_dependency`` (batch mode), a dependency error is retried like a retriable one."""

    def __init__(self, worker: WorkerSettings, *, label: str = "",
                 on_retry: Callable[[CaptionflowError], None] | None = None,
                 on_dependency: Callable[[DependencyError], Awaitable[bool]] | None = None,
                 ) -> None:
        self._w = worker
        self._label = label
        self._on_retry = on_retry
        self._on_dependency = on_dependency
        self.count = 1

    async def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        while True:
            try:
                return await fn()
            except DependencyError as e:
                if self._on_dependency is None:
                    await self._backoff_or_raise(e)
                    continue
                log.info("%s: attempt %d waits for %s: %s", self._label, self.count,
                         e.dependency, e)
                if await self._on_dependency(e):
                    await self._backoff_or_raise(e)
            except EventError as e:
                if not e.retriable:
                    raise
                await self._backoff_or_raise(e)

    async def _backoff_or_raise(self, e: CaptionflowError) -> None:
        if self.count >= self._w.max_attempts:
            raise e
        backoff_ms = min(self._w.retry_backoff_max_ms,
                         self._w.retry_backoff_ms * 2 ** (self.count - 1))
        hint_s = getattr(e, "retry_after_s", None)
        if hint_s is not None:
            backoff_ms = max(backoff_ms, int(hint_s * 1000))
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
    backend is gone; ``attempts.count`` tells how many attempts were made either way.

    ``clips`` may return the clips decoded (a list) or a :class:`ClipStream` (windows decoded
    on demand): then at most ``video.windows_in_flight`` windows are decoded or captioned at
    a time and each window's frames are let go once its caption is back, so an event's
    memory is bounded by that many windows, whatever the video's length. When one window
    fails for good, the windows still running are cancelled."""
    options = event.options
    overrides = options.frame_overrides() if options else {}
    started = time.monotonic()
    images = await event_images(event, settings, attempts)
    images_s = time.monotonic() - started
    opened = await attempts.run(lambda: clips(event.reference, overrides))
    stream: ClipStream = ClipList(opened, time.monotonic() - started - images_s) \
        if isinstance(opened, list) else opened
    prompt = event.prompt(settings.serving.default_prompt)
    sampling = options.sampling.model_dump(exclude_none=True) \
        if options and options.sampling else {}
    count = stream.count
    got: list[Clip | None] = [None] * count
    results: list[CaptionResult | None] = [None] * count
    gate = asyncio.Semaphore(settings.video.windows_in_flight)
    caption_spans: list[tuple[float, float]] = []

    async def window(i: int) -> None:
        async with gate:
            clip = await attempts.run(lambda: stream.clip(i))

            def attempt() -> Awaitable[CaptionResult]:
                # Unique per attempt: a result can only ever reach the request that asked.
                request_id = f"{event.id}#w{clip.window_index or 0}#a{attempts.count}" \
                             f"-{uuid.uuid4().hex[:8]}"
                return caption(CaptionRequest(request_id, clip, prompt, sampling, images))

            asked = time.monotonic()
            results[i] = await attempts.run(attempt)
            caption_spans.append((asked, time.monotonic()))
            got[i] = clip.without_frames() if count > 1 else clip

    try:
        if count == 1:
            await window(0)
        else:
            try:
                async with asyncio.TaskGroup() as group:
                    for i in range(count):
                        group.create_task(window(i))
            except BaseExceptionGroup as eg:
                raise _first_error(eg) from None
    finally:
        await stream.aclose()
    done_clips = [c for c in got if c is not None]
    done_results = [r for r in results if r is not None]
    caption_s = max(e for _, e in caption_spans) - min(a for a, _ in caption_spans)
    if count == 1 and done_clips[0].window_index is None:
        text, finish = done_results[0].text, done_results[0].finish_reason
    else:
        text = "\n".join(f"[{c.start_s:.1f}s-{window_end_s(c):.1f}s] {r.text}"
                         for c, r in zip(done_clips, done_results, strict=True))
        finish = "length" if any(r.finish_reason == "length" for r in done_results) else "stop"
    return EventCaption(text=text, prompt=prompt, finish_reason=finish, clips=done_clips,
                        results=done_results, fetch_decode_s=images_s + stream.fetch_decode_s,
                        caption_s=caption_s)


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The error that ends the event: a fatal one if any (the worker must stop), else the
    first; cancellations of sibling windows are only their consequence."""
    flat: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for inner in e.exceptions:
                walk(inner)
        else:
            flat.append(e)

    walk(group)
    for e in flat:
        if isinstance(e, FatalError):
            return e
    for e in flat:
        if not isinstance(e, asyncio.CancelledError):
            return e
    return flat[0]
