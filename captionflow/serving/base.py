"""The one interface every captioning backend implements."""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from captionflow.errors import DependencyState, EngineTimeoutError
from captionflow.video.clip import Clip

# Per-request sampling overrides a caller may set; anything else is an invalid request.
SAMPLING_KEYS = frozenset(
    {"temperature", "top_p", "top_k", "max_tokens", "repetition_penalty", "seed"})


@dataclass(frozen=True, slots=True)
class CaptionRequest:
    """One prompt for the model.

    ``request_id`` is unique per in-flight request and is how a result finds its way back to
    its event: the worker builds it from the event id, the window and the attempt.
    ``images`` (uint8 ``(H, W, 3)`` RGB, from :func:`captionflow.video.images.load_images`)
    go into the user turn before the video, in order. Without a ``clip`` the request is
    text only (a summary of window captions). With ``json_schema`` the output is constrained
    to JSON that the schema accepts (structured outputs); a schema the engine cannot compile
    fails the request with ``invalid_request``.
    """

    request_id: str
    clip: Clip | None
    prompt: str
    sampling: Mapping[str, Any] = field(default_factory=dict)
    images: tuple[np.ndarray, ...] = ()
    json_schema: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class CaptionResult:
    request_id: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: tuple[int, ...] = ()
    queue_ms: float = 0.0
    inference_ms: float = 0.0
    # The prompt as the model saw it (chat template + video placeholders), when known.
    prompt_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class EngineCapacity:
    """How many requests an engine runs at once, read from the engine itself."""

    running: int
    source: str  # where the figure comes from, for the start-up log


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """Requests inside the engine now: being run, and queued there for a slot."""

    running: int
    waiting: int


class EngineProgress:
    """Requests in flight and when the engine last showed progress (a token, a finished
    request), so a hung engine can be told from a busy one."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.last_progress = time.monotonic()

    def started(self) -> None:
        if self.in_flight == 0:
            # An idle engine owes nothing: the stall clock starts with the first request.
            self.last_progress = time.monotonic()
        self.in_flight += 1

    def progressed(self) -> None:
        self.last_progress = time.monotonic()

    def ended(self, *, ok: bool) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        if ok:
            self.progressed()

    def stalled_for_s(self) -> float:
        """Seconds without progress while requests are in flight; 0 when idle."""
        return time.monotonic() - self.last_progress if self.in_flight else 0.0


class CaptionBackend(abc.ABC):
    """Async captioning backend. ``caption`` is safe to call concurrently; batching across
    concurrent calls is the backend's job (vLLM's continuous batching does it)."""

    name: str = "base"
    _progress: EngineProgress | None = None

    @property
    def progress(self) -> EngineProgress:
        if self._progress is None:
            self._progress = EngineProgress()
        return self._progress

    async def caption_tracked(self, request: CaptionRequest, *,
                              timeout_s: float) -> CaptionResult:
        """``caption`` with a deadline, counted in :attr:`progress`. A request past the
        deadline is cancelled (which aborts it inside the engine) and fails with
        ``EngineTimeoutError``."""
        progress = self.progress
        progress.started()
        ok = False
        try:
            try:
                async with asyncio.timeout(timeout_s):
                    result = await self.caption(request)
            except TimeoutError as e:
                raise EngineTimeoutError(
                    f"request {request.request_id}: no result within "
                    f"serving.request_timeout_s={timeout_s:g} s") from e
            ok = True
            return result
        finally:
            progress.ended(ok=ok)

    def capacity(self) -> EngineCapacity | None:
        """What the started engine runs at once; None when it cannot say."""
        return None

    def load(self) -> EngineLoad | None:
        """The engine's running and waiting requests now; None when it cannot say."""
        return None

    async def prepare(self, *, requests: int | None = None,
                      sample: CaptionRequest | None = None) -> None:
        """A batch job says, before :meth:`start`, that about ``requests`` requests will
        come (and, once decoded, shows one of them as ``sample``), so the backend may size
        itself for them and do what costs nothing to undo (imports) while the first rows
        decode. Default: nothing."""

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def caption(self, request: CaptionRequest) -> CaptionResult:
        """Caption one request. Raises an ``EventError`` subclass for a failure of this
        request alone, ``EngineDeadError`` when the backend cannot serve anything any more."""

    @abc.abstractmethod
    async def healthy(self) -> bool:
        """Whether the backend answers now (the worker's readiness probe and the probe that
        ends an engine outage). May send a tiny request; callers bound it with a timeout."""

    async def health_state(self) -> DependencyState:
        """What the backend says to a probe: up, down, or, where it can tell, overloaded
        or misconfigured (a remote server refusing this worker's key)."""
        return DependencyState.UP if await self.healthy() else DependencyState.DOWN

    @abc.abstractmethod
    def model_info(self) -> dict[str, Any]:
        """At least ``{"model": name}``; the name goes into every caption event."""

    async def __aenter__(self) -> CaptionBackend:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
