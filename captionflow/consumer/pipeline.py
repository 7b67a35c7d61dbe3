"""One record, end to end: parse -> frames -> caption -> the output event.

Every record ends as exactly one output: a caption event, or a dead-letter event carrying
the error code. Only fatal errors (dead engine) escape, and then nothing is published for
the record, so its offset is not committed and it is redelivered after a restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from aiokafka.structs import ConsumerRecord

from captionflow.cache import CaptionCache, open_cache
from captionflow.captioning import Attempts, ClipsFn, EventCaption, caption_event
from captionflow.config import Settings
from captionflow.consumer.publish import fit_caption
from captionflow.errors import (
    CaptionflowError,
    DecodeCrashedError,
    DependencyError,
    FatalError,
    InternalError,
)
from captionflow.metrics import Metrics
from captionflow.schemas.codec import dead_letter, decode_video_event, encode, now_rfc3339
from captionflow.schemas.events import (
    CaptionEvent,
    SourceCoordinates,
    StageTimings,
    TokenUsage,
    VideoEvent,
    VideoInfo,
)
from captionflow.serving.base import CaptionRequest, CaptionResult
from captionflow.video.clip import Clip

log = logging.getLogger(__name__)
# Output keys stay short whatever the input's key was.
MAX_KEY_CHARS = 1024


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
                 clips: ClipsFn,
                 caption: Callable[[CaptionRequest], Awaitable[CaptionResult]],
                 model_name: str, metrics: Metrics, worker_id: str,
                 on_dependency: Callable[[DependencyError], Awaitable[bool]] | None = None,
                 cache: CaptionCache | None | Literal["settings"] = "settings",
                 stopping: Callable[[], bool] = lambda: False) -> None:
        self._s = settings
        self._stopping = stopping
        # The caption cache from settings.cache unless the caller hands one (or None).
        self._cache = open_cache(settings, model=model_name, metrics=metrics) \
            if cache == "settings" else cache
        self._on_dependency = on_dependency
        self._clips = clips
        self._caption = caption
        self._model = model_name
        self._metrics = metrics
        self._worker = worker_id

    async def process(self, record: ConsumerRecord[bytes, bytes]) -> Output:
        started = time.monotonic()
        event: VideoEvent | None = None
        attempts = Attempts(self._s.worker, label=where(record), on_retry=self._retried,
                            on_dependency=self._on_dependency)
        try:
            event = decode_video_event(
                record.value, fallback_id=self._fallback_id(record),
                max_bytes=self._s.kafka.max_event_bytes)
            attempts = Attempts(self._s.worker, label=f"{where(record)} id={event.id}",
                                on_retry=self._retried, on_dependency=self._on_dependency)
            result = await caption_event(event, clips=self._clips, caption=self._caption,
                                         settings=self._s, attempts=attempts,
                                         cache=self._cache)
            caption = self._caption_event(event, record, result, attempts.count, started)
            value, dropped = fit_caption(caption, event.id,
                                         self._s.kafka.max_request_size_bytes)
            if dropped:
                self._metrics.outputs_reduced.inc()
                log.warning("%s id=%s: caption event above kafka.max_request_size_bytes; "
                            "dropped %s to fit", where(record), event.id, dropped)
            self._metrics.events_captioned.inc()
            return Output(self._s.topics.output, event.id, value, event.id)
        except FatalError:
            raise
        except asyncio.CancelledError:
            raise
        except DecodeCrashedError as e:
            if not self._stopping():
                return self.dead_letter_output(record, e, event.id if event else None,
                                               attempts.count)
            # Stopping is never the record's fault: a decoder that died while the worker
            # stops (a signal to its whole process group) abandons the record, uncommitted,
            # for the next owner, as a decoder pool closed at shutdown does.
            log.warning("%s id=%s: decoder died while the worker stops; left uncommitted",
                        where(record), event.id if event else None)
            raise asyncio.CancelledError(str(e)) from None
        except Exception as e:
            error = e if isinstance(e, CaptionflowError) else InternalError(
                f"unexpected {type(e).__name__}: {e}")
            if not isinstance(e, CaptionflowError):
                log.exception("%s id=%s: bug while processing", where(record),
                              event.id if event else None)
            return self.dead_letter_output(record, error, event.id if event else None,
                                           attempts.count)

    def dead_letter_output(self, record: ConsumerRecord[bytes, bytes], error: CaptionflowError,
                           event_id: str | None, attempts: int) -> Output:
        """The record's dead-letter event, bounded to fit the producer's limit."""
        log.warning("%s id=%s: dead-lettered: %s", where(record), event_id, error)
        self._metrics.events_dead_lettered.labels(error.code.value).inc()
        dl = dead_letter(
            record.value, error, attempts=attempts, key=record.key, source=_coords(record),
            event_id=event_id, worker=self._worker,
            payload_max_bytes=self._s.worker.dead_letter_payload_max_bytes)
        key = dl.id or dl.key or self._fallback_id(record)
        return Output(self._s.topics.dead_letter, key[:MAX_KEY_CHARS], encode(dl), dl.id,
                      error.code.value)

    def _retried(self, error: CaptionflowError) -> None:
        self._metrics.events_retried.labels(error.code.value).inc()

    def _fallback_id(self, record: ConsumerRecord[bytes, bytes]) -> str:
        if record.key:
            return record.key[:MAX_KEY_CHARS].decode("utf-8", "replace")
        return f"{record.topic}:{record.partition}:{record.offset}"

    def _caption_event(self, event: VideoEvent, record: ConsumerRecord[bytes, bytes],
                       result: EventCaption, attempts: int, started: float) -> CaptionEvent:
        m = self._metrics
        m.frames_decoded.inc(result.frames_decoded)
        video_info = _video_info(result.clips)
        if video_info.bytes_read is not None:
            m.video_bytes_read.observe(video_info.bytes_read)
        made = result.engine_made()  # cache hits spent no tokens here (see cache metrics)
        usage = TokenUsage(prompt_tokens=result.prompt_tokens,
                           completion_tokens=result.completion_tokens)
        m.tokens.labels("prompt").inc(sum(r.prompt_tokens for c in made for r in c.results))
        m.tokens.labels("completion").inc(
            sum(r.completion_tokens for c in made for r in c.results))
        queue_ms = max(r.queue_ms for r in result.results)
        inference_ms = max(r.inference_ms for r in result.results) or result.caption_s * 1000
        if made:  # an event served wholly by the cache spent no engine time
            m.stage_seconds.labels("inference").observe(inference_ms / 1000)
        for generated in made:
            m.captions.labels(generated.status).inc()
            for status in generated.regenerated_for:
                m.caption_regenerations.labels(status).inc()
        return CaptionEvent(
            id=event.id, video=event.video, image=event.image,
            conversation=event.conversation_with_prompt(result.prompt), caption=result.text,
            model=self._model, finish_reason=result.finish_reason, usage=usage,
            video_info=video_info, windows=result.window_captions(),
            **result.quality_fields(),
            timings=StageTimings(fetch_decode_ms=round(result.fetch_decode_s * 1000, 3),
                                 queue_ms=round(queue_ms, 3),
                                 inference_ms=round(inference_ms, 3),
                                 total_ms=round((time.monotonic() - started) * 1000, 3)),
            metadata=event.metadata, source=_coords(record), attempts=attempts,
            worker=self._worker, created_at=now_rfc3339())


def _coords(record: ConsumerRecord[bytes, bytes]) -> SourceCoordinates:
    return SourceCoordinates(topic=record.topic, partition=record.partition, offset=record.offset)


def _video_info(clips: list[Clip]) -> VideoInfo:
    first, facts = clips[0], clips[0].facts
    return VideoInfo(
        duration_s=facts.duration_s, source_fps=facts.source_fps,
        total_frames=facts.total_frames, width=facts.width, height=facts.height,
        codec=facts.codec, rotation_deg=facts.rotation_deg,
        frames_sampled=sum(c.num_frames for c in clips), sample_fps=first.sample_fps,
        frame_width=int(first.frames.shape[2]), frame_height=int(first.frames.shape[1]),
        # Each clip carries the event's running total (captionflow.video.source).
        bytes_read=max((c.extra["bytes_read"] for c in clips if "bytes_read" in c.extra),
                       default=None),
        decode_device=_decode_device(clips))


def _decode_device(clips: list[Clip]) -> str | None:
    """The event's decode device; "cpu" when any window fell back to it."""
    devices = {str(c.extra["decode_device"]) for c in clips if "decode_device" in c.extra}
    if not devices:
        return None
    return "cpu" if "cpu" in devices else devices.pop()
