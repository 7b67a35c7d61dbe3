"""Worker fixtures: distinct real videos, worker settings, a worker running in-process on the
shared vLLM engine, and ``live_worker`` (a worker under traffic, for the Prometheus test)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import pytest_asyncio

from captionflow.broker import EmbeddedBroker
from captionflow.config import KafkaSettings, ServingSettings, Settings, TopicSettings
from captionflow.consumer.service import Worker
from captionflow.kafka import ensure_topics
from captionflow.metrics import Metrics
from captionflow.producer import Publisher
from captionflow.serving.base import CaptionBackend, CaptionRequest
from captionflow.video.source import load_clips
from tests.support.kafka_helpers import read_topic

N_VIDEOS = 12
_live_counter = itertools.count()


def make_video(path: Path, seed: int, *, frames: int = 8, fps: int = 4, width: int = 112,
               height: int = 84, codec: str = "libx264") -> Path:
    """A small real video whose frames differ by seed (so captions differ by video)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height // 14, width // 14, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            img = np.kron(np.roll(base, i, axis=1), np.ones((14, 14, 1), dtype=np.uint8))
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="session")
def caption_videos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("worker-videos")
    return [make_video(root / f"v{i:02d}.mp4", seed=i) for i in range(N_VIDEOS)]


def worker_settings(kafka: KafkaSettings, topics: TopicSettings, group_id: str,
                    serving: ServingSettings, roots: tuple[Path, ...],
                    **overrides: Any) -> Settings:
    """Fast settings for tests: short group timeouts (Tansu holds joins for
    max(1 s, session_timeout/2)), small frames, frequent commits, a free metrics port."""
    values: dict[str, Any] = {
        "kafka": kafka.model_dump(), "topics": topics.model_dump(),
        "serving": serving.model_dump(),
        "video": {"allowed_roots": roots, "fps": 2.0, "max_frames": 4, "min_frames": 2,
                  "min_pixels": 28 * 28 * 4, "max_pixels": 112 * 84},
        "worker": {"group_id": group_id, "session_timeout_ms": 2000,
                   "heartbeat_interval_ms": 200, "commit_interval_ms": 200, "max_wait_ms": 20,
                   "revoke_grace_s": 1.5, "shutdown_grace_s": 20,
                   # One request per caption, so captions equal reference_captions' (the
                   # tiny model's 12-token captions are all truncated); the gate has its
                   # own tests (test_captions_engine.py).
                   "quality_gate_retries": 0},
        "metrics": {"host": "127.0.0.1", "port": 0},
    }
    for dotted, value in overrides.items():
        section, name = dotted.split(".")
        values[section] = {**values[section], name: value}
    return Settings(**values)


async def reference_captions(backend: CaptionBackend, settings: Settings,
                             videos: list[Path]) -> dict[str, str]:
    """Each video captioned alone, one request at a time: what the worker must reproduce."""
    out = {}
    for i, video in enumerate(videos):
        [clip] = load_clips(str(video), settings.video)
        result = await backend.caption(CaptionRequest(
            f"reference-{i}", clip, settings.serving.default_prompt))
        out[str(video)] = result.text
    return out


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, backend: CaptionBackend, *,
                         expect_exit_code: int = 0, stop_timeout_s: float = 60,
                         ) -> AsyncIterator[tuple[Worker, asyncio.Task[int]]]:
    """A Worker on the shared engine, stopped gracefully on exit if still running. The
    test fails if the worker does not stop within ``stop_timeout_s``, raises, or exits
    with another code than ``expect_exit_code``."""
    worker = Worker(settings, backend=backend, metrics=Metrics.fresh())
    task = asyncio.create_task(worker.run())
    started = asyncio.create_task(worker.started.wait())
    done, _ = await asyncio.wait({task, started}, timeout=60,
                                 return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        started.cancel()
        task.result()  # raises the start-up error
        raise RuntimeError(f"worker exited at start with {task.result()}")
    if started not in done:
        started.cancel()
        raise TimeoutError("worker did not start polling within 60 s")
    try:
        yield worker, task
    finally:
        worker.stop()
        try:
            code = await asyncio.wait_for(asyncio.shield(task), stop_timeout_s)
        except TimeoutError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            pytest.fail(f"worker did not stop within {stop_timeout_s:.0f} s")
    assert code == expect_exit_code, f"worker exited with {code}, expected {expect_exit_code}"


@dataclass
class LiveWorker:
    worker: Worker
    metrics_url: str
    target: str
    topics: TopicSettings


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def live_worker(broker: EmbeddedBroker, vllm_backend: CaptionBackend, tiny_settings,
                      caption_videos: list[Path]) -> AsyncIterator[LiveWorker]:
    """A real worker under traffic (captions and dead letters), kept running (and fed an
    event a second) until the module that uses it ends: beyond that it would only load
    the shared engine under every later test."""
    kafka = broker.kafka_settings()
    n = next(_live_counter)
    topics = TopicSettings(input=f"live{n}.in", output=f"live{n}.out",
                           dead_letter=f"live{n}.dlq", partitions=4)
    await ensure_topics(kafka, (topics.input, topics.output, topics.dead_letter), partitions=4)
    settings = worker_settings(kafka, topics, f"live{n}", tiny_settings,
                               (caption_videos[0].parent,))
    async with running_worker(settings, vllm_backend) as (worker, _), \
            Publisher(kafka, topic=topics.input) as pub:
        report = await pub.publish_inputs([str(v) for v in caption_videos[:4]])
        await pub._producer.send_and_wait(topics.input, b"{broken json")
        await read_topic(kafka, topics.output, expected=len(report.sent), timeout_s=120)
        await read_topic(kafka, topics.dead_letter, expected=1, timeout_s=60)

        async def feed() -> None:
            for i in itertools.count():
                await pub.publish_inputs([str(caption_videos[i % len(caption_videos)])])
                await asyncio.sleep(1.0)

        feeder = asyncio.create_task(feed())
        try:
            yield LiveWorker(worker, f"http://127.0.0.1:{worker.http_port}/metrics",
                             f"127.0.0.1:{worker.http_port}", topics)
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
