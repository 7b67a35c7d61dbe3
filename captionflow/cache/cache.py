"""Lookups and writes of caption entries, bounded in time, coalesced within a process.

``lookup(key)`` answers with the cached :class:`Caption` (a hit), a :class:`Claim` (a miss:
this caller makes the caption, then ``fulfil``\\s or ``abandon``\\s the claim), or a
:class:`Pending` (another task of this process is making it: ``await pending.wait()``
after making your own claims, never before, so two events that each claim what the other
waits for cannot block each other). A store that fails or answers late is an outage of the
cache only: the lookup is a miss, the write is skipped, both are counted, and for
``cache.retry_after_ms`` the store is not asked at all.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import orjson

from captionflow.aio import in_daemon_thread
from captionflow.cache.key import caption_key, engine_identity, sampled_without_seed
from captionflow.cache.stores import Store, open_store
from captionflow.caption_result import Caption
from captionflow.config import Settings
from captionflow.errors import CacheUnavailableError
from captionflow.metrics import Metrics
from captionflow.serving.base import CaptionResult

log = logging.getLogger(__name__)
T = TypeVar("T")
ENTRY_VERSION = 1


def encode_entry(key: str, caption: Caption, model: str) -> bytes:
    """Caption, status, usage and every generation (with its engine time) of one entry."""
    return orjson.dumps({
        "v": ENTRY_VERSION, "key": key, "model": model, "text": caption.text,
        "finish_reason": caption.finish_reason, "status": caption.status,
        "parsed": caption.parsed, "created_at": time.time(),
        "generations": [{"finish_reason": r.finish_reason, "status": st,
                         "prompt_tokens": r.prompt_tokens,
                         "completion_tokens": r.completion_tokens,
                         "inference_ms": r.inference_ms}
                        for r, st in zip(caption.results, caption.statuses, strict=False)]})


def decode_entry(key: str, raw: bytes) -> tuple[Caption, float]:
    """The cached caption (its ``results`` carry the stored usage, no engine time) and the
    engine milliseconds it saves."""
    data = orjson.loads(raw)
    if data.get("v") != ENTRY_VERSION or data.get("key") != key:
        raise ValueError(f"entry {key} has version {data.get('v')} / key {data.get('key')}")
    gens = data["generations"]
    results = tuple(CaptionResult(
        request_id=f"cache:{key}", text=data["text"] if i == len(gens) - 1 else "",
        finish_reason=g["finish_reason"], prompt_tokens=int(g["prompt_tokens"]),
        completion_tokens=int(g["completion_tokens"])) for i, g in enumerate(gens))
    caption = Caption(text=data["text"], finish_reason=data["finish_reason"],
                      status=data["status"], results=results,
                      statuses=tuple(g["status"] for g in gens), parsed=data.get("parsed"),
                      key=key, hit=True)
    return caption, sum(float(g.get("inference_ms") or 0) for g in gens)


class Pending:
    """A caption another task of this process is making."""

    def __init__(self, key: str, future: asyncio.Future[Caption | None]) -> None:
        self.key = key
        self._future = future

    async def wait(self) -> Caption | None:
        """The caption, or None when its maker failed (then make it yourself)."""
        return await asyncio.shield(self._future)


class Claim:
    """This caller makes the caption for ``key``; exactly one of ``fulfil``/``abandon``."""

    def __init__(self, cache: CaptionCache, key: str,
                 future: asyncio.Future[Caption | None]) -> None:
        self.key = key
        self._cache = cache
        self._future = future

    @property
    def open(self) -> bool:
        return not self._future.done()

    async def fulfil(self, caption: Caption) -> Caption:
        """Hand ``caption`` to the waiters and write it to the store (bounded); returns
        it with its key."""
        caption = _with_key(caption, self.key)
        self._cache._resolve(self.key, self._future, caption)
        await self._cache.put(self.key, caption)
        return caption

    def abandon(self) -> None:
        if self.open:
            self._cache._resolve(self.key, self._future, None)


def _with_key(caption: Caption, key: str) -> Caption:
    return dataclasses.replace(caption, key=key)


class CaptionCache:
    """One driver's view of a store (see the module docstring). ``stats`` counts lookups
    by result (hit, miss, error, bypass) and writes (write_ok, write_error); ``metrics``,
    when given, gets the same counts and the engine time and tokens saved."""

    def __init__(self, store: Store, *, engine: Mapping[str, Any], model: str,
                 timeout_ms: int, retry_after_ms: int, cache_sampled: bool = True,
                 metrics: Metrics | None = None) -> None:
        self.store = store
        self.engine = dict(engine)
        self.model = model
        self._timeout_s = timeout_ms / 1000
        self._retry_after_s = retry_after_ms / 1000
        self._cache_sampled = cache_sampled
        self._metrics = metrics
        self._inflight: dict[str, asyncio.Future[Caption | None]] = {}
        self._down_until = 0.0
        self.stats: Counter[str] = Counter()
        self.saved_engine_s = 0.0
        self.saved_tokens: Counter[str] = Counter()

    def key(self, request: Mapping[str, Any]) -> str:
        return caption_key(self.engine, request)

    def cacheable(self, sampling: Mapping[str, Any], *, event_allows: bool) -> bool:
        """Whether a request with these effective sampling values uses the cache."""
        if not event_allows or (not self._cache_sampled and sampled_without_seed(sampling)):
            self._count("bypass")
            return False
        return True

    async def lookup(self, key: str) -> Caption | Claim | Pending:
        future = self._inflight.get(key)
        if future is not None:
            self._count("coalesced")
            return Pending(key, future)
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            raw = await self._call(self.store.get, key)
        except CacheUnavailableError as e:
            self._error("lookup", e)
            return Claim(self, key, future)
        except BaseException:
            self._resolve(key, future, None)
            raise
        if raw is None:
            self._count("miss")
            return Claim(self, key, future)
        try:
            caption, engine_ms = decode_entry(key, raw)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("cache entry %s in %s is unreadable (%s); captioning again", key,
                        self.store.url, e)
            self._count("miss")
            return Claim(self, key, future)
        self._count("hit")
        self._saved(caption, engine_ms / 1000)
        self._resolve(key, future, caption)
        return caption

    async def put(self, key: str, caption: Caption) -> None:
        try:
            await self._call(self.store.put, key, encode_entry(key, caption, self.model))
        except CacheUnavailableError as e:
            self._error("write", e)
            return
        self._count("write_ok")

    def _resolve(self, key: str, future: asyncio.Future[Caption | None],
                 caption: Caption | None) -> None:
        if not future.done():
            future.set_result(caption)
        if self._inflight.get(key) is future:
            del self._inflight[key]

    def waiter_hit(self, caption: Caption) -> Caption:
        """A caption another task made while this one waited: counted as a hit."""
        self._count("hit")
        self._saved(caption, sum(r.inference_ms for r in caption.results) / 1000)
        return dataclasses.replace(caption, hit=True)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if time.monotonic() < self._down_until:
            raise CacheUnavailableError(
                f"cache store {self.store.url} failed recently; skipped for "
                f"cache.retry_after_ms={self._retry_after_s * 1000:.0f}")
        try:
            async with asyncio.timeout(self._timeout_s):
                return await in_daemon_thread(fn, *args, name="captionflow-cache")
        except TimeoutError as e:
            raise CacheUnavailableError(
                f"cache store {self.store.url} did not answer within cache.timeout_ms="
                f"{self._timeout_s * 1000:.0f}") from e
        except CacheUnavailableError:
            raise
        except Exception as e:
            raise CacheUnavailableError(f"cache store {self.store.url}: {e!r}") from e

    def _error(self, op: str, e: CacheUnavailableError) -> None:
        if time.monotonic() >= self._down_until:
            log.warning("caption cache %s failed (%s); captioning without the cache for "
                        "cache.retry_after_ms=%.0f", op, e, self._retry_after_s * 1000)
        self._down_until = time.monotonic() + self._retry_after_s
        self._count("error" if op == "lookup" else "write_error")

    def _count(self, result: str) -> None:
        self.stats[result] += 1
        if self._metrics is None:
            return
        if result.startswith("write_"):
            self._metrics.cache_writes.labels(result[6:]).inc()
        elif result != "coalesced":
            self._metrics.cache_lookups.labels(result).inc()

    def _saved(self, caption: Caption, engine_s: float) -> None:
        prompt = sum(r.prompt_tokens for r in caption.results)
        completion = sum(r.completion_tokens for r in caption.results)
        self.saved_engine_s += engine_s
        self.saved_tokens["prompt"] += prompt
        self.saved_tokens["completion"] += completion
        if self._metrics is not None:
            self._metrics.cache_saved_engine_seconds.inc(engine_s)
            self._metrics.cache_saved_tokens.labels("prompt").inc(prompt)
            self._metrics.cache_saved_tokens.labels("completion").inc(completion)


def open_cache(settings: Settings, *, model: str,
               metrics: Metrics | None = None) -> CaptionCache | None:
    """The driver's cache from ``settings.cache`` (None when disabled); ``model`` is the
    backend's model name."""
    c = settings.cache
    if not c.enabled:
        return None
    store = open_store(c.store, c, settings.video)
    return CaptionCache(store, engine=engine_identity(settings, model), model=model,
                        timeout_ms=c.timeout_ms, retry_after_ms=c.retry_after_ms,
                        cache_sampled=settings.serving.cache_sampled, metrics=metrics)
