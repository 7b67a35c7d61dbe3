"""The production backend: Qwen2.5-VL on vLLM's in-process AsyncLLMEngine (``AsyncLLM``).

Concurrent ``caption`` calls are batched by vLLM's continuous batching. Every call is keyed
by its ``request_id``, which vLLM carries through to the output, so a result can only come
back to the call that sent it. When the engine dies (or is shut down) every waiting call
fails with :class:`EngineDeadError` instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any

from captionflow.aio import in_daemon_thread
from captionflow.config import ServingSettings, VideoSettings
from captionflow.errors import (
    CaptionflowError,
    ConfigError,
    EngineDeadError,
    EngineOverloadedError,
    EngineRequestFailedError,
    InvalidRequestError,
    PromptTooLongError,
)
from captionflow.serving import fast_video_processor
from captionflow.serving.base import (
    SAMPLING_KEYS,
    CaptionBackend,
    CaptionRequest,
    CaptionResult,
    EngineCapacity,
    EngineLoad,
)
from captionflow.serving.engine_plan import (
    check_model_path,
    clip_tokens,
    encoder_tokens_needed,
    vision_geometry,
)
from captionflow.serving.engine_setup import (
    check_engine_limits,
    engine_args,
    on_cpu,
    plan_engine,
    prepare_vllm_environment,
)
from captionflow.serving.engine_stats import SchedulerCounts, engine_capacity
from captionflow.serving.engine_stop import stop_engine, stop_output_handler
from captionflow.serving.prompt import (
    QWEN2_5_VL,
    build_messages,
    model_family,
    render_prompt,
    video_metadata,
)

log = logging.getLogger(__name__)

# How often the watchdog asks the engine whether it is still alive.
_WATCH_INTERVAL_S = 0.5
# An engine idle longer than this is probed with a one-token request.
_PROBE_IDLE_S = 10.0
# Distinct user texts whose rendered prompt is kept (most events use the default prompt).
_PROMPT_CACHE_SIZE = 1024


def sampling_values(settings: ServingSettings, overrides: dict[str, Any]) -> dict[str, Any]:
    """The settings' sampling defaults with a request's overrides applied; unknown keys are
    the caller's mistake and fail that request alone."""
    unknown = set(overrides) - SAMPLING_KEYS
    if unknown:
        raise InvalidRequestError(
            f"unknown sampling option(s) {sorted(unknown)}; allowed: {sorted(SAMPLING_KEYS)}")
    values = {key: getattr(settings, key) for key in SAMPLING_KEYS}
    values.update(overrides)
    return values


def _import_engine() -> Any:
    from vllm import AsyncLLMEngine

    return AsyncLLMEngine


class VllmBackend(CaptionBackend):
    name = "vllm"

    def __init__(self, settings: ServingSettings, video: VideoSettings | None = None) -> None:
        """``video`` are the sampling budgets the engine must fit (the defaults when None)."""
        self.settings = settings
        self._video = video or VideoSettings()
        self._engine: Any = None
        self._tokenizer: Any = None
        self._dead: EngineDeadError | None = None
        self._dead_event = asyncio.Event()
        self._watchdog: asyncio.Task[None] | None = None
        self._in_flight: set[str] = set()
        # Rendered chat prompts by (user text, image count, video or not): the template is
        # rendered once per distinct key.
        self._prompt_cache: dict[tuple[str | None, int, bool], str] = {}
        # Generation-config stop ids other than the tokenizer's EOS (set at start).
        self._extra_stop_ids: tuple[int, ...] = ()
        # Video metadata and timestamps differ by model family (prompt.video_metadata).
        self._family = QWEN2_5_VL
        self._scheduler = SchedulerCounts()
        self._job_requests: int | None = None
        self._job_sample_tokens: int | None = None
        self._importing: asyncio.Future[Any] | None = None

    @property
    def engine(self) -> Any:
        """The underlying ``AsyncLLM`` (for metrics and tests); None before ``start``."""
        return self._engine

    async def prepare(self, *, requests: int | None = None,
                      sample: CaptionRequest | None = None) -> None:
        """Remember the job's size (and one of its requests) for the engine plan, and start
        importing vLLM (seconds) while the first rows decode; :meth:`start` waits for it
        and builds the engine. A model path that holds no checkpoint is refused here, before
        any row is decoded (:class:`ConfigError`).

        The import runs in a daemon thread and nothing else waits for it: a run whose rows
        all fail before the model (missing or unreadable files) ends without it."""
        if requests is not None:
            self._job_requests = requests
        if sample is not None and sample.clip is not None:
            t, h, w = sample.clip.frames.shape[:3]
            self._job_sample_tokens = clip_tokens(t, h, w, vision_geometry(
                self.settings.model, self.settings.mm_processor_kwargs))
        if self._importing is None:
            check_model_path(self.settings)
            prepare_vllm_environment(self.settings.work_dir)
            self._importing = asyncio.ensure_future(
                in_daemon_thread(_import_engine, name="vllm-import"))
            # start() imports again and reports a failure; a run that never starts the
            # engine has nothing to report.
            self._importing.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def start(self) -> None:
        if self._engine is not None:
            return
        prepare_vllm_environment(self.settings.work_dir)
        if self._importing is not None:  # finish prepare()'s import off the event loop
            with contextlib.suppress(Exception):
                await self._importing
        cpu = on_cpu()
        plan = plan_engine(self.settings, self._video, cpu=cpu, requests=self._job_requests,
                           sample_tokens=self._job_sample_tokens)
        check_engine_limits(plan.settings, cpu=cpu, video=self._video)
        self.settings = plan.settings
        log.info("vLLM engine settings for %s on %s: %s", self.settings.model,
                 "CPU" if cpu else "GPU", plan.describe())
        AsyncLLMEngine = _import_engine()
        # The frontend's video preprocessing runs in this process: same tensors, fewer copies.
        fast_video_processor.install()
        args = engine_args(self.settings)
        try:
            # Building takes seconds and holds no event-loop state (vLLM starts its output
            # task on the first request), so the loop keeps decoding rows meanwhile.
            self._engine = await asyncio.to_thread(
                AsyncLLMEngine.from_engine_args, args,
                stat_loggers=[self._scheduler.stat_logger()])
        except (ValueError, TypeError) as e:
            raise ConfigError(
                f"vLLM refused the serving settings for {self.settings.model}: {e}") from e
        except Exception as e:
            raise EngineDeadError(f"vLLM engine failed to start for {self.settings.model}: "
                                  f"{type(e).__name__}: {e}") from e
        self._tokenizer = self._engine.get_tokenizer()
        self._extra_stop_ids = self._generation_stop_ids()
        self._family = model_family(
            getattr(self._engine.model_config.hf_config, "model_type", None))
        self._watchdog = asyncio.create_task(self._watch(), name="vllm-engine-watchdog")
        log.info("vLLM engine ready: model=%s max_model_len=%d", self.settings.model,
                 self.settings.max_model_len)

    async def close(self) -> None:
        """Fail every waiting call with EngineDeadError, then shut the engine down."""
        self._mark_dead(EngineDeadError("the vLLM engine was shut down"))
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        engine, self._engine = self._engine, None
        if engine is not None:
            # Let the failed callers run before the synchronous shutdown holds the loop.
            await asyncio.sleep(0)
            await stop_output_handler(engine)
            stop_engine(engine)

    async def healthy(self) -> bool:
        """vLLM's ``check_health`` only reports a dead engine core; a hung one (stopped,
        deadlocked) looks healthy to it. So when the engine has shown no progress lately
        and has nothing in flight, a one-token text request proves it still generates.
        With requests in flight, whether they progress is the stall watch's to judge
        (``progress.stalled_for_s``): a probe would only queue behind them."""
        if self._engine is None or self._dead is not None:
            return False
        try:
            await self._engine.check_health()
        except Exception:
            return False
        progress = self.progress
        if progress.in_flight or time.monotonic() - progress.last_progress < _PROBE_IDLE_S:
            return True
        from vllm import SamplingParams

        request_id = f"captionflow-probe-{uuid.uuid4().hex[:12]}"
        try:
            async for _ in self._engine.generate(
                    {"prompt": "ping"}, SamplingParams(max_tokens=1, temperature=0.0),
                    request_id=request_id):
                pass
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("vLLM probe request failed: %r", e)
            return False
        progress.progressed()
        return True

    def capacity(self) -> EngineCapacity | None:
        if self._engine is None:
            return None
        largest = min(self.settings.max_model_len,
                      encoder_tokens_needed(self.settings, self._video) + self.settings.max_tokens)
        return engine_capacity(self._engine, largest)

    def load(self) -> EngineLoad | None:
        if self._engine is None:
            return None
        if not self.progress.in_flight:
            return EngineLoad(0, 0)  # the scheduler reports nothing once it is idle
        return self._scheduler.load()

    def model_info(self) -> dict[str, Any]:
        return {"model": self.settings.served_model_name or self.settings.model,
                "backend": self.name, "max_model_len": self.settings.max_model_len,
                "dtype": self.settings.dtype}

    def prompt_text(self, prompt: str | None, images: int = 0, *, video: bool = True) -> str:
        """The full chat-templated prompt for a user's text (``images`` image placeholders,
        then the video placeholder unless ``video`` is False, then the text)."""
        if self._tokenizer is None:
            raise EngineDeadError("the vLLM backend is not started; call start() first")
        key = (prompt, images, video)
        text = self._prompt_cache.get(key)
        if text is None:
            messages = build_messages(prompt, system_prompt=self.settings.system_prompt,
                                      default_prompt=self.settings.default_prompt,
                                      images=images, video=video)
            text = render_prompt(self._tokenizer, messages)
            if len(self._prompt_cache) >= _PROMPT_CACHE_SIZE:
                self._prompt_cache.clear()
            self._prompt_cache[key] = text
        return text

    def sampling_params(self, overrides: dict[str, Any],
                        json_schema: Mapping[str, Any] | None = None) -> Any:
        """vLLM sampling parameters; with ``json_schema``, constrained to that schema.

        The grammar lets the tokenizer's EOS end the output only where the JSON is complete,
        but vLLM also stops on the generation config's other stop ids (Qwen's
        ``<|endoftext|>``), which the grammar does not forbid mid-object: those are banned
        for a structured request, so it can only end where the grammar does."""
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import StructuredOutputsParams

        values = sampling_values(self.settings, overrides)
        try:
            if json_schema is not None:
                values["structured_outputs"] = StructuredOutputsParams(json=dict(json_schema))
                if self._extra_stop_ids:
                    values["logit_bias"] = {i: -100.0 for i in self._extra_stop_ids}
            return SamplingParams(**values)
        except (ValueError, TypeError, VLLMClientError) as e:
            raise InvalidRequestError(f"invalid sampling options {dict(overrides)}: {e}") from e

    def _generation_stop_ids(self) -> tuple[int, ...]:
        eos = getattr(self._tokenizer, "eos_token_id", None)
        try:
            config = self._engine.model_config.try_get_generation_config()
        except Exception:
            return ()
        ids = config.get("eos_token_id") if config else None
        ids = {ids} if isinstance(ids, int) else set(ids or ())
        return tuple(sorted(i for i in ids if i != eos))

    async def caption(self, request: CaptionRequest) -> CaptionResult:
        if self._dead is not None:
            raise self._dead
        if self._engine is None:
            raise EngineDeadError("the vLLM backend is not started; call start() first")
        if request.request_id in self._in_flight:
            raise InvalidRequestError(
                f"request id {request.request_id!r} is already in flight; ids must be unique")
        params = self.sampling_params(dict(request.sampling), request.json_schema)
        media: dict[str, Any] = {}
        if request.clip is not None:
            try:
                metadata = video_metadata(request.clip, self._family)
            except ValueError as e:
                raise InvalidRequestError(str(e)) from e
            media["video"] = (request.clip.frames, metadata)
        if request.images:
            media["image"] = list(request.images)
        inputs: dict[str, Any] = {
            "prompt": self.prompt_text(request.prompt, len(request.images),
                                       video=request.clip is not None)}
        if media:
            inputs["multi_modal_data"] = media
        self._in_flight.add(request.request_id)
        run = asyncio.ensure_future(self._generate(request.request_id, inputs, params))
        dead = asyncio.ensure_future(self._dead_event.wait())
        try:
            await asyncio.wait({run, dead}, return_when=asyncio.FIRST_COMPLETED)
            if run.done():
                return run.result()
            run.cancel()
            with contextlib.suppress(BaseException):
                await run
            assert self._dead is not None
            raise EngineDeadError(
                f"request {request.request_id}: {self._dead.message}") from self._dead
        finally:
            dead.cancel()
            if not run.done():
                run.cancel()
            self._in_flight.discard(request.request_id)

    async def _generate(self, request_id: str, inputs: dict[str, Any],
                        params: Any) -> CaptionResult:
        started = time.perf_counter()
        final = None
        try:
            async for output in self._engine.generate(inputs, params, request_id=request_id):
                final = output
                self.progress.progressed()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise self._map_error(request_id, e) from e
        if final is None or not final.finished or not final.outputs:
            raise EngineRequestFailedError(f"request {request_id}: vLLM returned no output")
        if final.request_id != request_id:
            # vLLM keys outputs by id; a different id here would mean a wrong caption.
            raise EngineRequestFailedError(
                f"request {request_id}: vLLM returned the output of {final.request_id}")
        choice = final.outputs[0]
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        queue_ms = 0.0
        stats = getattr(final, "metrics", None)
        if stats is not None and getattr(stats, "scheduled_ts", 0) and stats.queued_ts:
            queue_ms = max(0.0, (stats.scheduled_ts - stats.queued_ts) * 1000.0)
        prompt_ids = tuple(final.prompt_token_ids or ())
        return CaptionResult(
            request_id=request_id, text=choice.text,
            finish_reason=str(choice.finish_reason or "stop"),
            prompt_tokens=len(prompt_ids), completion_tokens=len(choice.token_ids),
            token_ids=tuple(choice.token_ids), queue_ms=queue_ms,
            inference_ms=max(0.0, elapsed_ms - queue_ms), prompt_token_ids=prompt_ids)

    def _map_error(self, request_id: str, e: Exception) -> CaptionflowError:
        from vllm.exceptions import GracefulHTTPError, VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDead

        cause = e.__cause__ if e.__cause__ is not None else e
        text = f"{type(cause).__name__}: {cause}"
        if isinstance(e, VllmEngineDead) or (self._engine is not None and self._engine.errored):
            err = EngineDeadError(f"request {request_id}: the vLLM engine died ({text})")
            self._mark_dead(err)
            return err
        if "longer than the maximum model length" in str(cause) or \
                "exceeds the maximum" in str(cause):
            return PromptTooLongError(
                f"request {request_id}: {cause} Send fewer frames or pixels "
                "(video.max_frames, video.max_pixels) or raise serving.max_model_len.")
        if isinstance(cause, GracefulHTTPError):
            return EngineOverloadedError(f"request {request_id}: engine queue is full ({text})")
        # vLLM's own validation errors (a schema its grammar backend cannot compile) carry
        # the library's error as their cause.
        if isinstance(cause, (VLLMClientError, ValueError, TypeError)) or \
                isinstance(e, (VLLMClientError, ValueError, TypeError)):
            return InvalidRequestError(f"request {request_id}: vLLM rejected it ({text})")
        return EngineRequestFailedError(f"request {request_id}: {text}")

    def _mark_dead(self, error: EngineDeadError) -> None:
        if self._dead is None:
            self._dead = error
            self._dead_event.set()

    async def _watch(self) -> None:
        # A dead engine core fails its own waiters too, but only once they read their queue;
        # the watchdog also catches a death while nothing is reading.
        while self._dead is None:
            await asyncio.sleep(_WATCH_INTERVAL_S)
            engine = self._engine
            if engine is not None and engine.errored:
                log.error("vLLM engine core died; failing %d in-flight request(s)",
                          len(self._in_flight))
                self._mark_dead(EngineDeadError("the vLLM engine core died"))
