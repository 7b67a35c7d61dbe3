"""One record, end to end: parse -> frames -> caption -> the output event.

Every record ends as exactly one output: a caption event, or a dead-letter event carrying
the error code. Only fatal errors (dead engine) escape, and then nothing is published for
the record, so its offset is not committed and it is redelivered after a restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from aiokafka.structs import ConsumerRecord

from captionflow.config import Settings
from captionflow.errors import CaptionflowError, EventError, FatalError, InternalError
from captionflow.metrics import Metrics
from captionflow.schemas.codec import dead_letter, decode_video_event, encode, now_rfc3339
from captionflow.schemas.events import (
    CaptionEvent,
    SourceCoordinates,
    StageTimings,
    TokenUsage,
    VideoEvent,
    VideoInfo,
    WindowCaption,
)
from captionflow.serving.base import CaptionRequest, CaptionResult
from captionflow.video.clip import Clip

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Output:
    topic: str
    key: str
    value: bytes
    event_id: str | None
    error_code: str | None = None


def where(record: ConsumerRecord[bytes, bytes]) -> str:
    return f"{record.topic}[{record.partition}]@{record.offset}"


class RecordPipeline:
    """Turns a consumed record into its output event. Stateless across records."""

    def __init__(self, settings: Settings, *,
                 clips: Callable[[str, dict], Awaitable[list[Clip]]],
                 caption: Callable[[CaptionRequest], Awaitable[CaptionResult]],
                 model_name: str, metrics: Metrics, worker_id: str) -> None:
        self._s = settings
        self._clips = clips
        self._caption = caption
        self._model = model_name
        self._metrics = metrics
        self._worker = worker_id

    async def process(self, record: ConsumerRecord[bytes, bytes]) -> Output:
        started = time.monotonic()
        state = _Attempts()
        event: VideoEvent | None = None
        try:
            event = decode_video_event(
                record.value, fallback_id=self._fallback_id(record),
                max_bytes=self._s.kafka.max_event_bytes)
            caption = await self._caption_event(event, record, state, started)
            self._metrics.events_captioned.inc()
            return Output(self._s.topics.output, event.id, encode(caption), event.id)
        except FatalError:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as e:
            error = e if isinstance(e, CaptionflowError) else InternalError(
                f"unexpected {type(e).__name__}: {e}")
            if not isinstance(e, CaptionflowError):
                log.exception("%s id=%s: bug while processing", where(record),
                              event.id if event else None)
            log.warning("%s id=%s: dead-lettered: %s", where(record),
                        event.id if event else None, error)
            self._metrics.events_dead_lettered.labels(error.code.value).inc()
            dl = dead_letter(
                record.value, error, attempts=state.count, key=record.key,
                source=_coords(record), event_id=event.id if event else None,
                worker=self._worker)
            key = dl.id or (record.key.decode("utf-8", "replace") if record.key else
                            self._fallback_id(record))
            return Output(self._s.topics.dead_letter, key, encode(dl), dl.id, error.code.value)

    def _fallback_id(self, record: ConsumerRecord[bytes, bytes]) -> str:
        if record.key:
            return record.key.decode("utf-8", "replace")
        return f"{record.topic}:{record.partition}:{record.offset}"

    async def _caption_event(self, event: VideoEvent, record: ConsumerRecord[bytes, bytes],
                             state: _Attempts, started: float) -> CaptionEvent:
        options = event.options
        overrides = options.frame_overrides() if options else {}
        t0 = time.monotonic()
        clips = await self._retrying(lambda: self._clips(event.reference, overrides), state,
                                     record, event.id)
        fetch_decode_s = time.monotonic() - t0
        for clip in clips:
            self._metrics.frames_decoded.inc(clip.num_frames)
        prompt = event.prompt(self._s.serving.default_prompt)
        sampling = options.sampling.model_dump(exclude_none=True) \
            if options and options.sampling else {}

        async def one(clip: Clip) -> CaptionResult:
            async def attempt() -> CaptionResult:
                # Unique per attempt: a result can only ever reach the request that asked.
                request_id = f"{event.id}#w{clip.window_index or 0}#a{state.count}" \
                             f"-{uuid.uuid4().hex[:8]}"
                return await self._caption(CaptionRequest(request_id, clip, prompt, sampling))
            return await self._retrying(attempt, state, record, event.id)

        t1 = time.monotonic()
        results = await asyncio.gather(*(one(c) for c in clips))
        caption_s = time.monotonic() - t1
        usage = TokenUsage(prompt_tokens=sum(r.prompt_tokens for r in results),
                           completion_tokens=sum(r.completion_tokens for r in results))
        self._metrics.tokens.labels("prompt").inc(usage.prompt_tokens)
        self._metrics.tokens.labels("completion").inc(usage.completion_tokens)
        queue_ms = max(r.queue_ms for r in results)
        inference_ms = max(r.inference_ms for r in results) or caption_s * 1000
        windows = None
        if len(clips) > 1 or clips[0].window_index is not None:
            windows = [WindowCaption(
                index=c.window_index or 0, start_s=c.start_s,
                end_s=c.end_s if c.end_s is not None else c.facts.duration_s,
                caption=r.text, finish_reason=r.finish_reason,
                usage=TokenUsage(prompt_tokens=r.prompt_tokens,
                                 completion_tokens=r.completion_tokens))
                for c, r in zip(clips, results, strict=True)]
        text = results[0].text if windows is None else "\n".join(
            f"[{w.start_s:.1f}s-{w.end_s:.1f}s] {w.caption}" for w in windows)
        finish = results[0].finish_reason if len(results) == 1 else (
            "length" if any(r.finish_reason == "length" for r in results) else "stop")
        return CaptionEvent(
            id=event.id, video=event.video, image=event.image,
            conversation=event.conversation_with_prompt(prompt), caption=text,
            model=self._model, finish_reason=finish, usage=usage,
            video_info=_video_info(clips), windows=windows,
            timings=StageTimings(fetch_decode_ms=round(fetch_decode_s * 1000, 3),
                                 queue_ms=round(queue_ms, 3),
                                 inference_ms=round(inference_ms, 3),
                                 total_ms=round((time.monotonic() - started) * 1000, 3)),
            metadata=event.metadata, source=_coords(record), attempts=state.count,
            worker=self._worker, created_at=now_rfc3339())

    async def _retrying(self, fn: Callable[[], Awaitable[T]], state: _Attempts,
                        record: ConsumerRecord[bytes, bytes], event_id: str) -> T:
        w = self._s.worker
        while True:
            try:
                return await fn()
            except EventError as e:
                if not e.retriable or state.count >= w.max_attempts:
                    raise
                backoff_ms = min(w.retry_backoff_max_ms,
                                 w.retry_backoff_ms * 2 ** (state.count - 1))
                log.info("%s id=%s: attempt %d failed (%s); retrying in %d ms", where(record),
                         event_id, state.count, e, backoff_ms)
                self._metrics.events_retried.labels(e.code.value).inc()
                state.count += 1
                await asyncio.sleep(backoff_ms / 1000)


class _Attempts:
    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 1


def _coords(record: ConsumerRecord[bytes, bytes]) -> SourceCoordinates:
    return SourceCoordinates(topic=record.topic, partition=record.partition, offset=record.offset)


def _video_info(clips: list[Clip]) -> VideoInfo:
    first, facts = clips[0], clips[0].facts
    return VideoInfo(
        duration_s=facts.duration_s, source_fps=facts.source_fps,
        total_frames=facts.total_frames, width=facts.width, height=facts.height,
        codec=facts.codec, rotation_deg=facts.rotation_deg,
        frames_sampled=sum(c.num_frames for c in clips), sample_fps=first.sample_fps,
        frame_width=int(first.frames.shape[2]), frame_height=int(first.frames.shape[1]))
