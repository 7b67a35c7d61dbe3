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


def decoder_children() -> list[int]:
    """Pids of this process's decoder children."""
    me = str(os.getpid())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = stat.rsplit(")", 1)[1].split()[1]
        if ppid == me and b"captionflow.video.decoder_process" in cmdline:
            found.append(int(entry.name))
    return found


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


async def test_worker_survives_a_killed_decoder(kafka, topics, group_id, vllm_backend,
                                                tiny_settings, caption_videos,
                                                tmp_path: Path) -> None:
    # 300 frames of 1920x1080, every one sampled (fps 30). Measured in a decoder process
    # here: start-up and probe end near 0.4 s of CPU, the decode near 1.2 s; CPU time, not
    # wall time, so the window holds on a loaded machine.
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
        # The decoder process starts for this event; kill it once it is decoding: past its
        # start-up and the probe, well before the decode's end. Killed while idle between
        # the two, it would only be replaced and the event captioned.
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, "no decoder process got busy"
            pids = decoder_children()
            if pids and cpu_ticks(pids[0]) > 75:
                break
            await asyncio.sleep(0.01)
        os.kill(pids[0], signal.SIGKILL)
        [dead] = await read_topic(kafka, topics.dead_letter, expected=1, timeout_s=60)
        letter = decode_dead_letter_event(dead.value)
        assert letter.error.code == ErrorCode.DECODE_CRASHED
        report = await pub.publish_inputs([str(v) for v in caption_videos[:3]])
        records = await read_topic(kafka, topics.output, expected=3, timeout_s=120)
    assert {decode_caption_event(r.value).id for r in records} == \
        {ev.id for ev, _ in report.sent}
