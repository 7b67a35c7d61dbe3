"""The cache keys of one event's captions: per clip and prompt, and per summary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from captionflow.cache.cache import CaptionCache
from captionflow.cache.key import effective_sampling, image_digest, request_identity
from captionflow.config import Settings
from captionflow.schemas.events import VideoEvent


@dataclass
class EventKeys:
    """``cache`` is None when this event does not use the cache (none configured,
    ``options.cache: false``, or a sampled request with ``serving.cache_sampled`` off).
    ``content`` is the video's validator once known; clips are cached only with one."""

    cache: CaptionCache | None
    sampling: dict[str, Any] = field(default_factory=dict)
    schema: Mapping[str, Any] | None = None
    images: list[str] = field(default_factory=list)
    content: str | None = None

    @classmethod
    def make(cls, cache: CaptionCache | None, stream: Any, settings: Settings, *,
             event: VideoEvent, sampling: Mapping[str, Any],
             schema: Mapping[str, Any] | None, images: Sequence[np.ndarray]) -> EventKeys:
        if cache is None:
            return cls(None)
        effective = effective_sampling(settings, sampling)
        allows = event.options is None or event.options.cache is not False
        if not cache.cacheable(effective, event_allows=allows):
            return cls(None)
        keys = cls(cache, effective, schema, [image_digest(i) for i in images])
        if hasattr(stream, "content_validator") and hasattr(stream, "clip_identity"):
            keys.content = "?"  # the caller awaits the validator
        return keys

    def clip(self, stream: Any, i: int, prompts: Mapping[str, str]) -> dict[str, str | None]:
        if self.cache is None or not self.content:
            return dict.fromkeys(prompts)
        clip = stream.clip_identity(i)
        return {name: self.cache.key(request_identity(
            content=self.content, clip=clip, prompt=text, sampling=self.sampling,
            schema=self.schema, images=self.images)) for name, text in prompts.items()}

    def summary(self, texts: Mapping[str, str]) -> dict[str, str | None]:
        if self.cache is None:
            return dict.fromkeys(texts)
        return {name: self.cache.key(request_identity(
            content=None, clip=None, prompt=text, sampling=self.sampling, schema=self.schema))
            for name, text in texts.items()}
