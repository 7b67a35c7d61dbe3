"""`captionflow serve` as a real process: SIGKILL mid-batch loses nothing; SIGTERM drains,
exits 0, and a restart neither loses nor duplicates anything.

The first two processes caption through the session's ``vllm serve`` (openai backend): what
is tested is the worker process dying and draining, and an in-process engine would cost
each of them an engine start. The restart runs the default in-process vLLM engine, so a
real ``serve`` with its own engine is started and stopped with SIGTERM too."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from captionflow.producer import Publisher
from captionflow.schemas import decode_caption_event
from tests.support.kafka_helpers import read_topic, wait_all_committed
from tests.support.vllm_server import VllmServer
from tests.support.worker_fixtures import worker_settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _spawn(config: Path, log: Path) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    try:
        # Its own process group: the engine's processes die with it, as in a killed pod.
        return subprocess.Popen(
            [sys.executable, "-m", "captionflow", "serve", "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    finally:
        out.close()


def _kill_all(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the worker and every process it started (vLLM's engine core and workers)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


async def _captions(kafka, topic: str, want: set[str], timeout_s: float,
                    proc: subprocess.Popen[bytes], log: Path) -> collections.Counter[str]:
    """Caption ids on ``topic`` (with multiplicity) once every id in ``want`` is there."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = await read_topic(kafka, topic, expected=len(want), timeout_s=5, settle_s=0.2)
        seen = collections.Counter(decode_caption_event(r.value).id for r in records)
        if want <= set(seen):
            return seen
        if proc.poll() is not None:
            raise AssertionError(f"worker exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(want - set(seen))} events never captioned:\n"
                                 f"{log.read_text()[-3000:]}")


async def _publish(kafka, topic: str, videos: list[Path], n: int) -> set[str]:
    async with Publisher(kafka, topic=topic) as pub:
        report = await pub.publish_inputs([str(videos[i % len(videos)]) for i in range(n)])
    return {ev.id for ev, _ in report.sent}


async def test_sigkill_then_sigterm_restarts(kafka, topics, group_id, tiny_settings,
                                             vllm_server: VllmServer, caption_videos,
                                             tmp_path: Path, capsys) -> None:
    remote = tiny_settings.model_copy(update={
        "backend": "openai", "openai_base_url": vllm_server.url, "served_model_name": None})
    configs = {}
    for name, serving in (("remote", remote), ("in-process", tiny_settings)):
        settings = worker_settings(kafka, topics, group_id, serving,
                                   (caption_videos[0].parent,),
                                   **{"worker.max_batch_size": 4,
                                      "worker.commit_interval_ms": 500,
                                      "worker.max_in_flight": 8, "worker.resume_in_flight": 4})
        configs[name] = tmp_path / f"worker-{name}.json"
        configs[name].write_bytes(orjson.dumps(settings.model_dump(mode="json")))
    config = configs["remote"]
    log = tmp_path / "worker.log"

    # 1. SIGKILL mid-stream, restart: every event captioned at least once.
    first = await _publish(kafka, topics.input, caption_videos, 40)
    a = _spawn(config, log)
    try:
        await read_topic(kafka, topics.output, expected=5, timeout_s=240, settle_s=0)
        _kill_all(a)  # mid-stream, like a node or pod dying: no handler runs
        assert a.returncode == -signal.SIGKILL
    finally:
        _kill_all(a)
    b = _spawn(config, log)
    try:
        seen = await _captions(kafka, topics.output, first, 300, b, log)
        duplicates = sum(seen.values()) - len(first)
        with capsys.disabled():
            print(f"\nSIGKILL + restart: {len(first)} events, {duplicates} duplicate captions")

        # 2. SIGTERM mid-stream: drain, exit 0 within the grace period.
        second = await _publish(kafka, topics.input, caption_videos, 30)
        await read_topic(kafka, topics.output, expected=sum(seen.values()) + 3,
                         timeout_s=120, settle_s=0)
        started = time.monotonic()
        b.send_signal(signal.SIGTERM)
        assert b.wait(timeout=settings.worker.shutdown_grace_s + 15) == 0, log.read_text()[-3000:]
        drained_in_s = time.monotonic() - started
    finally:
        _kill_all(b)
    assert drained_in_s < settings.worker.shutdown_grace_s + 10

    # 3. Restart after SIGTERM (with new events for it too): nothing lost, nothing twice.
    third = await _publish(kafka, topics.input, caption_videos, 6)
    c = _spawn(configs["in-process"], log)
    try:
        seen = await _captions(kafka, topics.output, first | second | third, 300, c, log)
        again = {i: n for i, n in seen.items() if i in second | third and n > 1}
        assert again == {}, f"duplicated after a graceful stop: {again}"
        await wait_all_committed(kafka, topics.input, group_id)
        c.send_signal(signal.SIGTERM)
        assert c.wait(timeout=40) == 0
    finally:
        _kill_all(c)
    assert "Traceback" not in log.read_text()
