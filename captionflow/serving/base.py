"""The one interface every captioning backend implements."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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
    go into the user turn before the video, in order.
    """

    request_id: str
    clip: Clip
    prompt: str
    sampling: Mapping[str, Any] = field(default_factory=dict)
    images: tuple[np.ndarray, ...] = ()


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


class CaptionBackend(abc.ABC):
    """Async captioning backend. ``caption`` is safe to call concurrently; batching across
    concurrent calls is the backend's job (vLLM's continuous batching does it)."""

    name: str = "base"

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def caption(self, request: CaptionRequest) -> CaptionResult:
        """Caption one request. Raises an ``EventError`` subclass for a failure of this
        request alone, ``EngineDeadError`` when the backend cannot serve anything any more."""

    @abc.abstractmethod
    async def healthy(self) -> bool: ...

    @abc.abstractmethod
    def model_info(self) -> dict[str, Any]:
        """At least ``{"model": name}``; the name goes into every caption event."""

    async def __aenter__(self) -> CaptionBackend:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
