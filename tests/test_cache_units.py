"""The caption cache's pure logic: keys (what changes them and what does not), entries,
the file store, bounded lookups and writes, coalescing, and the outage rule. The engine and
worker tests are in test_cache_engine.py and test_cache_workers.py."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from captionflow.cache import CaptionCache, Claim, Pending, caption_key, open_cache
from captionflow.cache.cache import decode_entry, encode_entry
from captionflow.cache.file_store import FileStore
from captionflow.cache.key import effective_sampling, engine_identity, request_identity
from captionflow.cache.stores import open_store
from captionflow.cache.through import through_cache
from captionflow.caption_result import Caption
from captionflow.config import CacheSettings, Settings, VideoSettings
from captionflow.errors import CacheUnavailableError, ConfigError
from captionflow.metrics import Metrics
from captionflow.serving.base import CaptionResult

CLIP = {"start_s": 0.0, "end_s": 4.0, "window": None, "frames": [0, 2, 4, 6],
        "sample_fps": 2.0, "size": [84, 112], "device": "cpu"}


def _request(**change: Any) -> dict[str, Any]:
    settings = Settings()
    values: dict[str, Any] = {"content": "sha256:ab", "clip": CLIP, "prompt": "Describe.",
                              "sampling": effective_sampling(settings, {}), "schema": None}
    values.update(change)
    return request_identity(**values)


def _engine(**serving: Any) -> dict[str, Any]:
    return engine_identity(Settings(serving=serving), serving.get("model", "m"))


def test_equal_requests_give_equal_keys_whatever_the_order_of_their_fields() -> None:
    a = caption_key(_engine(), _request())
    b = caption_key(_engine(), dict(reversed(list(_request().items()))))
    assert a == b and len(a) == 64


@pytest.mark.parametrize("change", [
    {"content": "sha256:cd"},                                           # other bytes
    {"clip": {**CLIP, "frames": [0, 1, 2, 3]}},                         # frame policy (fps)
    {"clip": {**CLIP, "size": [56, 84]}},                               # frame policy (pixels)
    {"clip": {**CLIP, "start_s": 4.0, "end_s": 8.0, "window": 1}},      # time span
    {"prompt": "Describe briefly."},                                    # prompt
    {"sampling": {**effective_sampling(Settings(), {"max_tokens": 8})}},  # sampling
    {"schema": {"type": "object"}},                                     # JSON Schema
    {"images": ["0" * 64]},                                             # images sent
])
def test_any_difference_in_the_request_gives_another_key(change: dict[str, Any]) -> None:
    assert caption_key(_engine(), _request(**change)) != caption_key(_engine(), _request())


@pytest.mark.parametrize("serving", [
    {"model": "other/model"}, {"system_prompt": "Be terse."}, {"dtype": "bfloat16"},
    {"backend": "openai"}, {"mm_processor_kwargs": {"fps": 1}},
])
def test_any_difference_in_the_engine_gives_another_key(serving: dict[str, Any]) -> None:
    assert caption_key(_engine(**serving), _request()) != caption_key(_engine(), _request())


def test_model_revision_and_quality_gate_are_in_the_key(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"a": 1}')
    first = engine_identity(Settings(serving={"model": str(model)}), "m")
    (model / "config.json").write_text('{"a": 2}')
    assert engine_identity(Settings(serving={"model": str(model)}), "m") != first
    named = engine_identity(Settings(serving={"model": str(model)},
                                     cache={"model_revision": "abc123"}), "m")
    assert named["revision"] == "abc123"
    gate = engine_identity(Settings(worker={"quality_gate_retries": 0}), "m")
    assert gate != engine_identity(Settings(), "m")


def test_sampling_defaults_are_applied_before_hashing() -> None:
    settings = Settings()
    same = effective_sampling(settings, {"temperature": settings.serving.temperature})
    assert caption_key(_engine(), _request(sampling=same)) == caption_key(_engine(), _request())


def _caption(text: str = "a cat", generations: int = 2) -> Caption:
    results = tuple(CaptionResult(f"r{i}", text if i == generations - 1 else "x",
                                  "stop", 100 + i, 10 + i, inference_ms=50.0)
                    for i in range(generations))
    return Caption(text=text, finish_reason="stop", status="ok", results=results,
                   statuses=("repetitive",) * (generations - 1) + ("ok",))


def test_entry_holds_caption_status_usage_and_generations() -> None:
    caption, engine_ms = decode_entry("k" * 64, encode_entry("k" * 64, _caption(), "m"))
    assert (caption.text, caption.status, caption.generations) == ("a cat", "ok", 2)
    assert caption.statuses == ("repetitive", "ok") and caption.hit
    assert [(r.prompt_tokens, r.completion_tokens) for r in caption.results] == \
        [(100, 10), (101, 11)]
    assert all(r.inference_ms == 0 for r in caption.results) and engine_ms == 100.0
    with pytest.raises(ValueError):
        decode_entry("j" * 64, encode_entry("k" * 64, _caption(), "m"))


def test_file_store_writes_whole_entries(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "c")
    assert store.get("ab" * 32) is None
    store.put("ab" * 32, b"one")
    store.put("ab" * 32, b"two")
    assert store.get("ab" * 32) == b"two"
    assert [p.name for p in (tmp_path / "c").rglob("*") if p.is_file()] == [f"{'ab' * 32}.json"]


def test_store_registry_and_settings(tmp_path: Path) -> None:
    video = VideoSettings()
    assert isinstance(open_store(str(tmp_path), CacheSettings(), video), FileStore)
    assert open_store(tmp_path.as_uri(), CacheSettings(), video).root == tmp_path
    assert open_store("s3://b/p", CacheSettings(), video).url == "s3://b/p/"
    with pytest.raises(ConfigError):
        open_store("s3:///nobucket", CacheSettings(), video)
    with pytest.raises(ValueError, match="scheme"):
        CacheSettings(store="redis://h/0")
    assert open_cache(Settings(cache={"enabled": False}), model="m") is None


class _Store:
    """A store in memory that can fail or hang, counting calls."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.calls = 0
        self.fail = False
        self.hang_s = 0.0
        self.url = "mem://"

    def get(self, key: str) -> bytes | None:
        self.calls += 1
        self._misbehave()
        return self.data.get(key)

    def put(self, key: str, value: bytes) -> None:
        self.calls += 1
        self._misbehave()
        self.data[key] = value

    def _misbehave(self) -> None:
        if self.hang_s:
            time.sleep(self.hang_s)
        if self.fail:
            raise CacheUnavailableError("down")


def _cache(store: _Store, **kw: Any) -> CaptionCache:
    values: dict[str, Any] = {"engine": {"model": "m"}, "model": "m", "timeout_ms": 200,
                              "retry_after_ms": 0, "metrics": Metrics.fresh()}
    values.update(kw)
    return CaptionCache(store, **values)


async def test_miss_claim_fulfil_then_hit_with_metrics() -> None:
    store = _Store()
    cache = _cache(store)
    claim = await cache.lookup("k")
    assert isinstance(claim, Claim)
    stored = await claim.fulfil(_caption())
    assert stored.key == "k" and not stored.hit
    hit = await cache.lookup("k")
    assert isinstance(hit, Caption) and hit.hit and hit.text == "a cat"
    assert cache.stats == {"miss": 1, "write_ok": 1, "hit": 1}
    assert cache.saved_engine_s == pytest.approx(0.1)
    assert cache.saved_tokens == {"prompt": 201, "completion": 21}
    registry = cache._metrics.registry  # type: ignore[union-attr]
    assert registry.get_sample_value("captionflow_cache_lookups_total", {"result": "hit"}) == 1
    assert registry.get_sample_value("captionflow_cache_saved_tokens_total",
                                     {"kind": "completion"}) == 21


async def test_concurrent_lookups_of_one_key_make_it_once() -> None:
    cache = _cache(_Store())
    made = 0

    async def make(names: list[str]) -> dict[str, Caption]:
        nonlocal made
        made += 1
        await asyncio.sleep(0.05)
        return {n: _caption() for n in names}

    results = await asyncio.gather(*(through_cache(cache, {"c": "k"}, make) for _ in range(5)))
    assert made == 1 and {r["c"].text for r in results} == {"a cat"}
    assert sum(r["c"].hit for r in results) == 4


async def test_two_events_claiming_what_the_other_waits_for_do_not_block() -> None:
    cache = _cache(_Store())
    started = asyncio.Event()

    async def make(names: list[str]) -> dict[str, Caption]:
        started.set()
        await asyncio.sleep(0.02)
        return {n: _caption(n) for n in names}

    one = await cache.lookup("k1")   # another task's claim on k1, fulfilled later
    assert isinstance(one, Claim)
    task = asyncio.create_task(through_cache(cache, {"a": "k2", "b": "k1"}, make))
    await started.wait()
    waiting = await cache.lookup("k2")
    assert isinstance(waiting, Pending)
    await one.fulfil(_caption("b"))
    out = await asyncio.wait_for(task, 5)
    assert (out["a"].text, out["b"].text) == ("a", "b")
    assert (await asyncio.wait_for(waiting.wait(), 5)).text == "a"  # type: ignore[union-attr]


async def test_a_failed_maker_lets_the_waiters_make_it() -> None:
    cache = _cache(_Store())
    claim = await cache.lookup("k")
    assert isinstance(claim, Claim)

    async def make(names: list[str]) -> dict[str, Caption]:
        return {n: _caption("mine") for n in names}

    task = asyncio.create_task(through_cache(cache, {"c": "k"}, make))
    await asyncio.sleep(0.01)
    claim.abandon()
    assert (await asyncio.wait_for(task, 5))["c"].text == "mine"


async def test_store_down_or_late_is_a_counted_miss_and_is_skipped_for_a_while() -> None:
    store = _Store()
    store.fail = True
    cache = _cache(store, retry_after_ms=60_000)
    made = 0

    async def make(names: list[str]) -> dict[str, Caption]:
        nonlocal made
        made += 1
        return {n: _caption() for n in names}

    out = await through_cache(cache, {"c": "k"}, make)
    assert out["c"].text == "a cat" and made == 1
    assert cache.stats["error"] == 1 and store.calls == 1  # the write was skipped
    await through_cache(cache, {"c": "k2"}, make)
    assert store.calls == 1 and cache.stats["error"] == 2 and cache.stats["write_error"] == 2

    hung = _Store()
    hung.hang_s = 1.0
    slow = _cache(hung, timeout_ms=50)
    started = time.monotonic()
    assert isinstance(await slow.lookup("k"), Claim)
    assert time.monotonic() - started < 0.5 and slow.stats["error"] == 1


async def test_sampled_requests_bypass_only_when_configured() -> None:
    sampled = {"temperature": 0.7, "seed": None}
    assert _cache(_Store()).cacheable(sampled, event_allows=True)
    off = _cache(_Store(), cache_sampled=False)
    assert not off.cacheable(sampled, event_allows=True)
    assert off.cacheable({"temperature": 0.7, "seed": 3}, event_allows=True)
    assert off.cacheable({"temperature": 0.0, "seed": None}, event_allows=True)
    assert not off.cacheable({"temperature": 0.0}, event_allows=False)
    assert off.stats["bypass"] == 2


def test_store_calls_never_hold_the_loop_thread() -> None:
    store = _Store()
    cache = _cache(store)
    seen: list[str] = []
    original = store.get

    def get(key: str) -> bytes | None:
        seen.append(threading.current_thread().name)
        return original(key)

    store.get = get  # type: ignore[method-assign]
    asyncio.run(cache.lookup("k"))
    assert seen == ["captionflow-cache"]
