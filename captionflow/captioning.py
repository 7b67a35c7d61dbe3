"""Caption one VideoEvent: frames, then one request per clip, then the joined result.

The single implementation behind both the worker (``consumer/pipeline.py``) and batch mode
(``batch/runner.py``), including the retry rule for retriable errors.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from captionflow.cache import CaptionCache
from captionflow.cache.event_keys import EventKeys
from captionflow.cache.through import through_cache
from captionflow.caption_result import (
    Caption,
    EventCaption,
    joined,
    summary_prompt,
)
from captionflow.config import Settings, WorkerSettings
from captionflow.errors import (
    CaptionflowError,
    DependencyError,
    ErrorCode,
    EventError,
    FatalError,
    InvalidRequestError,
)
from captionflow.event_limits import (
    TokenBudget,
    check_prompt_count,
    check_schema_size,
    clamp_sampling,
)
from captionflow.quality import (
    REGENERATE,
    CaptionStatus,
    better,
    canonical_json,
    caption_status,
    parse_json,
    regeneration_sampling,
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
    ``on_dependency`` (batch mode), a dependency error is retried like a retriable one.

    This is the one retry layer of a caption request: one failing call makes at most
    ``worker.max_attempts * (serving.openai_max_retries + 1)`` POSTs to a remote server
    (docs/errors.md), and outages, overload and refusals it waits out are not counted."""

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
        # Jittered ("equal jitter"), so records that failed together do not retry together.
        backoff_ms = min(self._w.retry_backoff_max_ms,
                         self._w.retry_backoff_ms * 2 ** (self.count - 1))
        backoff_ms = int(backoff_ms * random.uniform(0.5, 1.0))
        hint_s = getattr(e, "retry_after_s", None)
        if hint_s is not None:
            backoff_ms = max(backoff_ms, int(hint_s * 1000))
        log.info("%s: attempt %d failed (%s); retrying in %d ms", self._label,
                 self.count, e, backoff_ms)
        if self._on_retry is not None:
            self._on_retry(e)
        self.count += 1
        await asyncio.sleep(backoff_ms / 1000)


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


def event_prompts(event: VideoEvent, settings: Settings) -> tuple[dict[str, str], bool]:
    """The event's prompts by name, and whether they were named (``options.prompts``); a
    single prompt is named ``caption``."""
    options = event.options
    if options is not None and options.prompts:
        check_prompt_count(len(options.prompts), settings.serving)
        return dict(options.prompts), True
    return {"caption": event.prompt(settings.serving.default_prompt)}, False


def event_schema(event: VideoEvent, settings: Settings) -> dict[str, Any] | None:
    options = event.options
    if options is None:
        return None
    if options.json_schema_name is not None:
        schema = settings.serving.json_schemas.get(options.json_schema_name)
        if schema is None:
            raise InvalidRequestError(
                f"options.json_schema_name {options.json_schema_name!r} is not one of the "
                f"worker's serving.json_schemas {sorted(settings.serving.json_schemas)}")
    else:
        schema = options.json_schema
        if schema is not None:
            check_schema_size(schema, settings.serving)
    if schema is not None:
        import jsonschema

        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as e:
            raise InvalidRequestError(
                f"options.json_schema is not a valid JSON Schema: {e.message} (at "
                f"{'/'.join(map(str, e.path)) or 'the root'})") from e
    return schema


async def gated_caption(tag: str, make: Callable[[str, Mapping[str, Any]], CaptionRequest], *,
                        sampling: Mapping[str, Any], schema: Mapping[str, Any] | None,
                        caption: CaptionFn, settings: Settings,
                        attempts: Attempts, budget: TokenBudget | None = None) -> Caption:
    """One caption through the quality gate: asked again while its status is truncated,
    repetitive or invalid_json, up to ``worker.quality_gate_retries`` times with adjusted
    sampling, while the event's ``budget`` has room for another request; the best attempt
    is kept (the earliest among equals)."""
    w, serving = settings.worker, settings.serving
    results: list[CaptionResult] = []
    statuses: list[CaptionStatus] = []
    kept: tuple[int, Any, bool] | None = None
    for retry in range(w.quality_gate_retries + 1):
        if retry and budget is not None and not budget.take_retry():
            log.info("%s: no quality-gate retry, serving.max_completion_tokens_per_event "
                     "is spent", tag)
            break
        asked = sampling if retry == 0 else regeneration_sampling(
            sampling, retry, base_temperature=serving.temperature,
            base_repetition_penalty=serving.repetition_penalty,
            repetition_penalty=w.quality_gate_repetition_penalty,
            temperature=w.quality_gate_temperature)

        def attempt(asked: Mapping[str, Any] = asked, retry: int = retry
                    ) -> Awaitable[CaptionResult]:
            # Unique per attempt: a result can only ever reach the request that asked.
            request_id = f"{tag}#g{retry}#a{attempts.count}-{uuid.uuid4().hex[:8]}"
            return caption(make(request_id, asked))

        result = await attempts.run(attempt)
        if budget is not None:
            budget.settle(result.completion_tokens)
        json_ok, parsed = parse_json(result.text, schema) if schema is not None \
            else (None, None)
        status = caption_status(result.text, result.finish_reason, json_ok=json_ok)
        results.append(result)
        statuses.append(status)
        if kept is None or better(status, statuses[kept[0]]):
            kept = (len(results) - 1, parsed if json_ok else None, bool(json_ok))
        if status not in REGENERATE:
            break
    assert kept is not None
    best = results[kept[0]]
    text = canonical_json(kept[1]) if kept[2] else best.text
    return Caption(text=text, finish_reason=best.finish_reason,
                   status=statuses[kept[0]], results=tuple(results), statuses=tuple(statuses),
                   parsed=kept[1])


async def caption_event(event: VideoEvent, *, clips: ClipsFn, caption: CaptionFn,
                        settings: Settings, attempts: Attempts,
                        cache: CaptionCache | None = None) -> EventCaption:
    """Raises ``EventError`` subclasses for this event alone and ``FatalError`` when the
    backend is gone; ``attempts.count`` tells how many attempts were made either way.

    ``clips`` may return the clips decoded (a list) or a :class:`ClipStream` (windows decoded
    on demand): then at most ``video.windows_in_flight`` windows are decoded or captioned at
    a time and each window's frames are let go once its captions are back, so an event's
    memory is bounded by that many windows, whatever the video's length. When one window
    fails for good, the windows still running are cancelled.

    Each clip is decoded once and asked every prompt at once (the engine shares the video
    between those requests); each caption goes through the quality gate. A windowed video
    with ``summarize`` gets one more text-only request per prompt.

    With a ``cache``, every window's and summary's captions are looked up first (keys:
    ``captionflow/cache/key.py``): a window whose captions are all cached is not decoded,
    and only the missing captions reach the engine, so a redelivered long video resumes at
    its first missing window. The stream must tell its clips apart before decoding them
    (``content_validator``, ``clip_identity``, ``planned_clip``); a plain list of clips is
    captioned without the cache."""
    options = event.options
    overrides = options.frame_overrides() if options else {}
    prompts, named = event_prompts(event, settings)
    schema = event_schema(event, settings)
    started = time.monotonic()
    images = await event_images(event, settings, attempts)
    images_s = time.monotonic() - started
    opened = await attempts.run(lambda: clips(event.reference, overrides))
    stream: ClipStream = ClipList(opened, time.monotonic() - started - images_s) \
        if isinstance(opened, list) else opened
    count = stream.count
    summarize = options.summarize if options and options.summarize is not None \
        else settings.serving.summarize_windows
    # A summary is reserved whenever the video may be windowed (one window counts).
    summaries = 1 if summarize and (count > 1 or settings.video.window_s) else 0
    try:
        sampling = clamp_sampling(options.sampling.model_dump(exclude_none=True)
                                  if options and options.sampling else {}, settings.serving)
        budget = TokenBudget(limit=settings.serving.max_completion_tokens_per_event,
                             per_request=sampling["max_tokens"],
                             first_requests=len(prompts) * (count + summaries))
        keys = EventKeys.make(cache, stream, settings, event=event, sampling=sampling,
                              schema=schema, images=images)
        if keys.content is not None:
            # Hashes the whole file: an error here must still release the stream.
            keys.content = await stream.content_validator()  # type: ignore[attr-defined]
    except BaseException:
        await stream.aclose()
        raise
    got: list[Clip | None] = [None] * count
    captions: list[dict[str, Caption] | None] = [None] * count
    gate = asyncio.Semaphore(settings.video.windows_in_flight)
    caption_spans: list[tuple[float, float]] = []

    async def all_prompts(tag: str, ask: Callable[[str, str, str], Awaitable[Caption]],
                          names: list[str]) -> dict[str, Caption]:
        order = list(prompts)
        if len(names) == 1:
            name = names[0]
            return {name: await ask(f"{tag}#p{order.index(name)}", name, prompts[name])}
        tasks = {}
        try:
            async with asyncio.TaskGroup() as group:
                for name in names:
                    tasks[name] = group.create_task(
                        ask(f"{tag}#p{order.index(name)}", name, prompts[name]))
        except BaseExceptionGroup as eg:
            raise _first_error(eg) from None
        return {name: task.result() for name, task in tasks.items()}

    async def window(i: int) -> None:
        async with gate:
            clip: Clip | None = None

            async def decode() -> None:
                nonlocal clip
                clip = await attempts.run(lambda: stream.clip(i))

            async def ask(tag: str, name: str, prompt: str) -> Caption:
                return await gated_caption(
                    tag, lambda rid, s: CaptionRequest(rid, clip, prompt, s, images, schema),
                    sampling=sampling, schema=schema, caption=caption, settings=settings,
                    attempts=attempts, budget=budget)

            asked = time.monotonic()
            by_name = await through_cache(
                keys.cache, keys.clip(stream, i, prompts),
                lambda names: all_prompts(f"{event.id}#w{_window_tag(stream, i, clip)}", ask,
                                          names), before_make=decode)
            captions[i] = by_name
            caption_spans.append((asked, time.monotonic()))
            if clip is None:
                clip = stream.planned_clip(i)  # type: ignore[attr-defined]
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
    windows = [c for c in captions if c is not None]
    windowed = count > 1 or done_clips[0].window_index is not None
    summarized = windowed and summarize
    if not windowed:
        event_captions = windows[0]
    elif summarized:
        texts = {name: summary_prompt(settings.serving.summary_prompt, prompt, done_clips,
                                      [w[name] for w in windows])
                 for name, prompt in prompts.items()}

        async def ask_summary(tag: str, name: str, prompt: str) -> Caption:
            return await gated_caption(
                tag, lambda rid, s: CaptionRequest(rid, None, texts[name], s, (), schema),
                sampling=sampling, schema=schema, caption=caption, settings=settings,
                attempts=attempts, budget=budget)

        asked = time.monotonic()
        event_captions = await through_cache(
            keys.cache, keys.summary(texts),
            lambda names: all_prompts(f"{event.id}#summary", ask_summary, names))
        caption_spans.append((asked, time.monotonic()))
    else:
        event_captions = {name: joined(done_clips, [w[name] for w in windows])
                          for name in prompts}
    caption_s = max(e for _, e in caption_spans) - min(a for a, _ in caption_spans)
    return EventCaption(prompts=prompts, named=named, captions=event_captions, windows=windows,
                        summarized=summarized, clips=done_clips,
                        fetch_decode_s=images_s + stream.fetch_decode_s, caption_s=caption_s)


def _window_tag(stream: ClipStream, i: int, clip: Clip | None) -> int:
    if clip is not None:
        return clip.window_index or 0
    identity = getattr(stream, "clip_identity", None)
    return (identity(i)["window"] or 0) if identity is not None else i


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
