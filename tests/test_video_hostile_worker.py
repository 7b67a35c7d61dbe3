"""A decoder crash inside a running worker: that event's dead letter, the next events
captioned by the same worker (real broker, real engine, a real SIGKILL)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from captionflow.errors import ErrorCode
from captionflow.producer import Publisher
from captionflow.schemas import decode_caption_event, decode_dead_letter_event
from tests.support.corpus import X264, _encode
from tests.support.kafka_helpers import read_topic
from tests.support.worker_fixtures import running_worker, worker_settings

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]


async def test_worker_survives_a_killed_decoder(kafka, topics, group_id, vllm_backend,
                                                tiny_settings, caption_videos,
                                                tmp_path: Path) -> None:
    # 300 frames of 1920x1080, every one sampled (fps 30): about a second of decoding.
    busy = tmp_path / "busy.mp4"
    _encode(busy, "libx264", width=1920, height=1080, fps=30, frames=300, gop=30, options=X264)
    settings = worker_settings(kafka, topics, group_id, tiny_settings,
                               (caption_videos[0].parent, tmp_path),
                               **{"video.decode_workers": 1, "video.decode_threads": 1,
                                  "video.fps": 30.0, "video.max_frames": 300,
                                  "worker.max_attempts": 1})
    async with running_worker(settings, vllm_backend) as (worker, _), \
            Publisher(kafka, topic=topics.input) as pub:
        await pub.publish_inputs([str(busy)])
        # Kill this worker's decoder once it is decoding (past start-up and probe): other
        # workers of the session (the live Prometheus one) have decoders of their own.
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, "no decoder process got busy decoding"
            pids = worker.frames.pool.busy_pids("decode") if worker.frames else []
            if pids:
                break
            await asyncio.sleep(0.01)
        os.kill(pids[0], signal.SIGKILL)
        dead_letters = await read_topic(kafka, topics.dead_letter, expected=1, timeout_s=120)
        assert len(dead_letters) == 1, (
            f"killed decoder {pids[0]}; busy now {worker.frames.pool.busy_pids()}, "
            f"in flight {worker.metrics.in_flight._value.get()}, outputs "
            f"{len(await read_topic(kafka, topics.output, expected=0, settle_s=0.2))}")
        [dead] = dead_letters
        letter = decode_dead_letter_event(dead.value)
        assert letter.error.code == ErrorCode.DECODE_CRASHED
        assert "during decode" in letter.error.message and "SIGKILL" in letter.error.message
        report = await pub.publish_inputs([str(v) for v in caption_videos[:3]])
        records = await read_topic(kafka, topics.output, expected=3, timeout_s=120)
    assert {decode_caption_event(r.value).id for r in records} == \
        {ev.id for ev, _ in report.sent}
