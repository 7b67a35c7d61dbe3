"""Caption events for the sink's tests, made with the project's own schemas and codec, and
the sink run in this process or as a real `captionflow sink`."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Iterable
from typing import Any

import orjson

from captionflow.config import KafkaSettings, MetricsSettings, Settings, SinkSettings, TopicSettings
from captionflow.kafka import make_producer
from captionflow.schemas.codec import encode
from captionflow.schemas.events import (
    CaptionEvent,
    SourceCoordinates,
    StageTimings,
    TokenUsage,
    Turn,
    VideoInfo,
    WindowCaption,
)

STATUSES = ("ok", "truncated", "repetitive", "empty", "invalid_json")
_WORDS = ("a red ball rolls across the floor while a dog watches from the sofa and the light "
          "changes as clouds pass over the window near the garden gate").split()


def caption_event(i: int, *, words: int = 30, seed: int = 0, noise_bytes: int = 0,
                  **extra: Any) -> bytes:
    """Caption event ``ev-{i:05d}``, with every nested part filled in; ``noise_bytes`` of
    random hex in its metadata make files that compress little; ``extra`` adds top-level
    fields the model does not know (as a newer worker would)."""
    rng = random.Random(seed * 1_000_003 + i)
    text = " ".join(rng.choice(_WORDS) for _ in range(words))
    event = CaptionEvent(
        id=f"ev-{i:05d}", video=[f"s3://videos/clip-{i}.mp4"],
        conversation=[Turn(from_="human", value="Please describe the video in detail.")],
        caption=f"caption {i}: {text}", model="Qwen/Qwen2.5-VL-7B-Instruct",
        finish_reason="stop", usage=TokenUsage(prompt_tokens=100 + i, completion_tokens=i % 97),
        video_info=VideoInfo(duration_s=10.0 + i % 7, source_fps=30.0, total_frames=300,
                             width=1280, height=720, codec="h264", frames_sampled=8,
                             sample_fps=2.0, frame_width=448, frame_height=252),
        windows=[WindowCaption(index=0, start_s=0.0, end_s=5.0, caption=f"first half {i}",
                               finish_reason="stop", usage=TokenUsage(prompt_tokens=50),
                               caption_json={"objects": ["ball", i]}),
                 WindowCaption(index=1, start_s=5.0, end_s=10.0, caption=f"second half {i}",
                               finish_reason="length", usage=TokenUsage(completion_tokens=3),
                               status="truncated")],
        status=STATUSES[i % len(STATUSES)],
        captions={"short": f"short {i}", "long": text},
        captions_status={"short": "ok", "long": "ok"},
        caption_json={"scene": "room", "count": i, "tags": ["a", "b"]},
        timings=StageTimings(fetch_decode_ms=1.5, inference_ms=float(i)),
        metadata={"batch": i // 100, "source": "test",
                  **({"noise": rng.randbytes(noise_bytes // 2 + 1).hex()[:noise_bytes]}
                     if noise_bytes else {})},
        source=SourceCoordinates(topic="captionflow.videos", partition=i % 4, offset=i),
        created_at=f"2026-12-0{1 + i % 3}T10:00:00.000Z")
    raw = encode(event)
    if extra:
        raw = orjson.dumps({**orjson.loads(raw), **extra})
    return raw


async def produce(kafka: KafkaSettings, topic: str, values: Iterable[bytes]) -> int:
    """Send every value keyed by its event id; return how many."""
    producer = make_producer(kafka, client_suffix="-test-producer", idempotent=False,
                             linger_ms=20)
    await producer.start()
    try:
        futures = []
        for value in values:
            try:
                key = str(orjson.loads(value).get("id", "")).encode()
            except (orjson.JSONDecodeError, AttributeError):
                key = None  # not an event: a malformed record
            futures.append(await producer.send(topic, value, key=key))
        await asyncio.gather(*futures)
        return len(futures)
    finally:
        await producer.stop()


def sink_settings(kafka: KafkaSettings, topics: TopicSettings, *, to: str, group_id: str,
                  video: Any = None, **sink: Any) -> Settings:
    values: dict[str, Any] = {"to": to, "group_id": group_id, "session_timeout_ms": 2000,
                              "heartbeat_interval_ms": 300, "poll_timeout_ms": 100,
                              "metrics_port": 0, "probe_interval_s": 1.0,
                              "retry_backoff_initial_ms": 200, "retry_backoff_max_ms": 1000,
                              "probe_timeout_s": 2.0}
    values.update(sink)
    extra = {"video": video} if video is not None else {}
    return Settings(kafka=kafka, topics=topics, sink=SinkSettings(**values),
                    metrics=MetricsSettings(host="127.0.0.1"), **extra)


@contextlib.asynccontextmanager
async def running_sink(settings: Settings) -> AsyncIterator[Any]:
    """A :class:`Sink` in this process, joined and polling; stopped (gracefully) at exit."""
    from captionflow.sink.service import Sink

    sink = Sink(settings)
    task = asyncio.create_task(sink.run())
    started = asyncio.create_task(sink.started.wait())
    done, _ = await asyncio.wait({task, started}, timeout=30,
                                 return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        started.cancel()
        task.result()
    assert started in done, "the sink did not join its group within 30 s"
    try:
        yield sink
    finally:
        sink.stop()
        assert await asyncio.wait_for(task, 60) == 0
