"""The caption cache shared through a real S3-compatible store (moto_server) by real worker
processes, and the store dying under a running worker.

Worker processes use the openai backend against ``OpenAIStandIn``, which hands every request
to the session's shared vLLM CPU engine and counts it by the worker's request id (event id
first): the counts below are requests that reached the real engine."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from captionflow.config import Settings
from captionflow.producer import Publisher
from captionflow.schemas import decode_caption_event
from captionflow.schemas.events import CaptionEvent, VideoEvent
from captionflow.serving.base import CaptionBackend
from tests.support.counting import CountingBackend, OpenAIStandIn
from tests.support.kafka_helpers import read_topic, wait_all_committed
from tests.support.s3_fixtures import MotoServer
from tests.support.worker_fixtures import make_video, running_worker, worker_settings

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session"),
              pytest.mark.timeout(600)]
WINDOWS = 12


def _spawn(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "CAPTIONFLOW_CACHE__ENABLED"}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "captionflow", "serve", "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**env, "PYTHONUNBUFFERED": "1"}, start_new_session=True)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _entries(server: MotoServer, bucket: str, prefix: str) -> int:
    listing = server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return int(listing.get("KeyCount", 0))


async def _caption_of(kafka: Any, topic: str, event_id: str, proc: subprocess.Popen[bytes],
                      log: Path, timeout_s: float = 120) -> CaptionEvent:
    deadline = time.monotonic() + timeout_s
    while True:
        records = await read_topic(kafka, topic, expected=1, timeout_s=2, settle_s=0)
        found = [e for e in map(decode_caption_event, (r.value for r in records))
                 if e.id == event_id]
        if found:
            return found[-1]
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no caption for {event_id} (worker rc {proc.poll()}):\n"
                                 f"{log.read_text()[-3000:]}")
        await asyncio.sleep(0.2)


async def _windowed_workers(vllm_backend: CaptionBackend, tiny_settings: Any, kafka: Any,
                            topics: Any, group_id: str, s3_server: MotoServer,
                            tmp_path: Path, store: str) -> tuple[OpenAIStandIn, Path, Path]:
    """A started counting stand-in in front of the shared engine, and the config file of
    workers that caption 2 s windows through it with the caption cache at ``store``."""
    standin = OpenAIStandIn(vllm_backend, model="tiny")
    await standin.start()
    serving = tiny_settings.model_copy(update={"backend": "openai",
                                               "openai_base_url": standin.base_url,
                                               "served_model_name": "tiny"})
    settings = worker_settings(kafka, topics, group_id, serving, (tmp_path,), **{
        "video.s3_endpoint_url": s3_server.endpoint_url, "video.s3_addressing_style": "path",
        "video.window_s": 2.0, "video.fps": 1.0, "video.windows_in_flight": 1})
    settings = settings.model_copy(update={"cache": Settings(cache={
        "enabled": True, "store": store}).cache})
    config = tmp_path / "worker.json"
    config.write_bytes(orjson.dumps(settings.model_dump(mode="json")))
    return standin, config, tmp_path / "workers.log"


async def test_a_long_video_killed_after_six_windows_resumes_on_the_next_worker_via_s3(
        vllm_backend: CaptionBackend, tiny_settings: Any, kafka, topics, group_id,
        s3_server: MotoServer, tmp_path: Path) -> None:
    short = make_video(tmp_path / "short.mp4", seed=41)
    long = make_video(tmp_path / "long.mp4", seed=42, frames=2 * WINDOWS * 2, fps=2)
    bucket, prefix = s3_server.new_bucket("cache"), "captions/"
    standin, config, log = await _windowed_workers(
        vllm_backend, tiny_settings, kafka, topics, group_id, s3_server, tmp_path,
        f"s3://{bucket}/{prefix}")
    standin.delay_s = 0.4  # windows finish one by one, so the kill lands mid-video
    a = _spawn(config, log)
    try:
        async with Publisher(kafka, topic=topics.input) as pub:
            await pub.send(VideoEvent(id="short-1", video=[str(short)]))
            first = await _caption_of(kafka, topics.output, "short-1", a, log)
            await pub.send(VideoEvent(id="long", video=[str(long)]))
            deadline = time.monotonic() + 120
            while _entries(s3_server, bucket, prefix) < 1 + WINDOWS // 2:
                assert time.monotonic() < deadline and a.poll() is None, log.read_text()[-3000:]
                await asyncio.sleep(0.02)
            _kill(a)  # no handler runs: what is in the store is what the next owner finds
    finally:
        _kill(a)
    stored = _entries(s3_server, bucket, prefix) - 1
    assert WINDOWS // 2 <= stored < WINDOWS
    asked_before = standin.by_event()["long"]
    standin.delay_s = 0.0
    b = _spawn(config, log)
    try:
        async with Publisher(kafka, topic=topics.input) as pub:
            long_event = await _caption_of(kafka, topics.output, "long", b, log, 180)
            await pub.send(VideoEvent(id="short-2", video=[str(short)]))
            second = await _caption_of(kafka, topics.output, "short-2", b, log)
        await wait_all_committed(kafka, topics.input, group_id)
        b.send_signal(signal.SIGTERM)
        assert b.wait(timeout=40) == 0
    finally:
        _kill(b)
        await standin.stop()
    asked = standin.by_event()
    with_cache = sum(w.cache_hit is True for w in long_event.windows or [])
    print(f"\nkilled after {stored} stored windows ({asked_before} asked); the next owner "
          f"asked {asked['long'] - asked_before}")
    assert asked["long"] - asked_before == WINDOWS - stored
    assert len(long_event.windows or []) == WINDOWS and with_cache == stored
    assert [w.index for w in long_event.windows or []] == list(range(WINDOWS))
    # The second worker's duplicate of the first worker's clip is a hit.
    assert asked["short-2"] == 0 and asked["short-1"] == 1
    assert second.cache is not None and second.cache.hit and second.caption == first.caption
    assert not await read_topic(kafka, topics.dead_letter, expected=0, timeout_s=1, settle_s=0)
    assert "Traceback" not in log.read_text()


async def test_the_store_killed_mid_stream_costs_only_cache_hits(
        vllm_backend: CaptionBackend, tiny_settings: Any, kafka, topics, group_id,
        caption_videos: list[Path], s3_env: None, tmp_path: Path) -> None:
    server = MotoServer(tmp_path / "moto.log").start()  # this test's own: it is killed
    try:
        bucket = server.new_bucket("dying")
        settings = worker_settings(kafka, topics, group_id, tiny_settings,
                                   (caption_videos[0].parent,), **{
                                       "video.s3_endpoint_url": server.endpoint_url,
                                       "video.s3_addressing_style": "path"})
        settings = settings.model_copy(update={"cache": Settings(cache={
            "enabled": True, "store": f"s3://{bucket}/c/", "timeout_ms": 500,
            "retry_after_ms": 1000}).cache})
        counting = CountingBackend(vllm_backend)
        videos = [str(v) for v in caption_videos[:4]]
        async with running_worker(settings, counting) as (worker, _), \
                Publisher(kafka, topic=topics.input) as pub:
            for i, v in enumerate(videos):
                await pub.send(VideoEvent(id=f"before-{i}", video=[v]))
            await read_topic(kafka, topics.output, expected=4, timeout_s=120, settle_s=0)
            assert server.process is not None
            server.process.kill()  # the store dies; the worker is not told
            server.process.wait(timeout=10)
            for i in range(8):  # duplicates of cached clips and new ones alike
                await pub.send(VideoEvent(id=f"after-{i}", video=[videos[i % 4]]))
            records = await read_topic(kafka, topics.output, expected=12, timeout_s=180)
            await wait_all_committed(kafka, topics.input, group_id)
            registry = worker.metrics.registry
            counts = {r: registry.get_sample_value("captionflow_cache_lookups_total",
                                                   {"result": r})
                      for r in ("hit", "miss", "error")}
            ready = registry.get_sample_value("captionflow_ready")
            up = {d: registry.get_sample_value("captionflow_dependency_up",
                                               {"dependency": d}) for d in ("broker", "engine")}
    finally:
        server.stop()
    ids = sorted(decode_caption_event(r.value).id for r in records)
    assert ids == sorted([f"before-{i}" for i in range(4)] + [f"after-{i}" for i in range(8)])
    assert not await read_topic(kafka, topics.dead_letter, expected=0, timeout_s=1, settle_s=0)
    # After the store died, each lookup failed or was skipped (cache.retry_after_ms) and
    # counted as an error, or waited for the same clip in flight in this worker (a hit);
    # every error made its caption with the engine, and nothing was a miss.
    assert counts["miss"] == 4 and counts["error"] >= 1
    assert counts["error"] + counts["hit"] == 8
    assert len(counting.requests) == 4 + counts["error"]
    assert ready == 1 and up == {"broker": 1, "engine": 1}


async def test_a_worker_joining_mid_video_costs_at_most_one_window_again(
        vllm_backend: CaptionBackend, tiny_settings: Any, kafka, topics, group_id,
        s3_server: MotoServer, tmp_path: Path) -> None:
    """Issue 20: a second worker joins while a 12-window video is in flight on the first.
    Whether its partition stays (the work goes on) or moves (the new owner finds the
    finished windows in the cache), the engine serves at most one window twice."""
    long = make_video(tmp_path / "long.mp4", seed=43, frames=2 * WINDOWS * 2, fps=2)
    bucket, prefix = s3_server.new_bucket("joins"), "captions/"
    standin, config, log = await _windowed_workers(
        vllm_backend, tiny_settings, kafka, topics, group_id, s3_server, tmp_path,
        f"s3://{bucket}/{prefix}")
    standin.delay_s = 0.4  # windows finish one by one, so the join lands mid-video
    a = _spawn(config, log)
    b: subprocess.Popen[bytes] | None = None
    try:
        async with Publisher(kafka, topic=topics.input) as pub:
            await pub.send(VideoEvent(id="long", video=[str(long)]))
        deadline = time.monotonic() + 120
        while _entries(s3_server, bucket, prefix) < WINDOWS // 2:
            assert time.monotonic() < deadline and a.poll() is None, log.read_text()[-3000:]
            await asyncio.sleep(0.02)
        asked_at_join = standin.by_event()["long"]
        b = _spawn(config, log)
        event = await _caption_of(kafka, topics.output, "long", a, log, 180)
        await wait_all_committed(kafka, topics.input, group_id)
        for proc in (a, b):
            proc.send_signal(signal.SIGTERM)
        assert a.wait(timeout=40) == 0 and b.wait(timeout=40) == 0, log.read_text()[-3000:]
    finally:
        _kill(a)
        if b is not None:
            _kill(b)
        await standin.stop()
    asked = standin.by_event()["long"]
    print(f"\njoined after {asked_at_join} window requests; {asked} in all")
    assert WINDOWS // 2 <= asked_at_join < WINDOWS
    assert asked <= WINDOWS + 1
    assert [w.index for w in event.windows or []] == list(range(WINDOWS))
    captions = [e for e in map(decode_caption_event, (r.value for r in await read_topic(
        kafka, topics.output, expected=1, timeout_s=2, settle_s=0.5))) if e.id == "long"]
    assert len(captions) == 1, "the video was published once"
    assert not await read_topic(kafka, topics.dead_letter, expected=0, timeout_s=1, settle_s=0)
