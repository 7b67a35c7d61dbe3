"""Delivery under faults, caused for real: oversized records, a SIGSTOPped engine core, a
SIGKILLed broker, a bad deploy tripping the poison guard. Real broker, real videos, the
real vLLM CPU engine; assertions on broker-side effects and the worker's own endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import psutil
import pytest
from aiokafka import AIOKafkaProducer

from captionflow.broker import EmbeddedBroker
from captionflow.config import TopicSettings
from captionflow.errors import ErrorCode
from captionflow.kafka import ensure_topics
from captionflow.producer import Publisher
from captionflow.schemas import decode_caption_event, decode_dead_letter_event
from tests.support.kafka_helpers import (
    committed_offsets,
    read_topic,
    wait_all_committed,
    wait_until,
)
from tests.support.worker_fixtures import running_worker, worker_settings

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session"),
              pytest.mark.timeout(600)]


async def _readyz(worker) -> int:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{worker.http_port}/readyz", timeout=5)
    return response.status_code


async def test_oversized_records_each_end_as_one_output_and_the_worker_lives(
        kafka, topics, group_id, vllm_backend, tiny_settings, caption_videos) -> None:
    settings = worker_settings(kafka, topics, group_id, tiny_settings,
                               (caption_videos[0].parent,))
    video = str(caption_videos[0])
    # Just under the input limit, so it is captioned; its echo does not fit the output's.
    envelope = len(orjson.dumps({"id": "meta", "video": [video], "metadata": {"blob": ""}}))
    big_metadata = orjson.dumps({"id": "meta", "video": [video], "metadata": {
        "blob": "m" * (settings.kafka.max_event_bytes - envelope - 16)}})
    assert 1_000_000 < len(big_metadata) < settings.kafka.max_event_bytes
    records = [(b"garbage", b"\xff\xfe" * 450_000),            # 900 KB, not JSON
               (b"huge", b'{"id": "huge", "pad": "' + b"h" * 2_097_152 + b'"}'),  # 2 MiB
               (b"meta", big_metadata),
               (b"fine", orjson.dumps({"id": "fine", "video": [video]}))]
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers,
                                max_request_size=8 << 20)
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topics.input, value, key=key, partition=0)
    finally:
        await producer.stop()

    async with running_worker(settings, vllm_backend) as (worker, task):
        captions = await read_topic(kafka, topics.output, expected=2, timeout_s=120)
        dead = await read_topic(kafka, topics.dead_letter, expected=2, timeout_s=60)
        await wait_all_committed(kafka, topics.input, group_id)
        assert not task.done(), "the worker must keep running"
        assert await _readyz(worker) == 200

    by_id = {e.id: e for e in map(decode_caption_event, (r.value for r in captions))}
    assert set(by_id) == {"meta", "fine"}
    assert by_id["meta"].dropped_fields == ["metadata"] and by_id["meta"].caption
    assert by_id["meta"].metadata == {} and by_id["fine"].dropped_fields is None
    assert all(len(r.value) <= settings.kafka.max_request_size_bytes for r in captions + dead)
    letters = {d.key: d for d in map(decode_dead_letter_event, (r.value for r in dead))}
    garbage, huge = letters["garbage"], letters["huge"]
    assert garbage.error.code == ErrorCode.MALFORMED_JSON
    assert huge.error.code == ErrorCode.PAYLOAD_TOO_LARGE
    assert (garbage.payload_size_bytes, huge.payload_size_bytes) == (
        len(records[0][1]), len(records[1][1]))
    assert garbage.payload_truncated and huge.payload_truncated


def _engine_core(backend) -> psutil.Process:
    """The engine-core child process of the in-process engine."""
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
                return child
    raise AssertionError("no VLLM::EngineCore child process found")


@contextlib.contextmanager
def _stopped(process: psutil.Process) -> Iterator[None]:
    """SIGSTOP the process; SIGCONT whatever happens, so later tests get their engine."""
    os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(process.pid, signal.SIGCONT)


async def test_hung_engine_turns_the_worker_not_ready_and_it_recovers_after_sigcont(
        kafka, topics, group_id, vllm_backend, tiny_settings, caption_videos) -> None:
    settings = worker_settings(kafka, topics, group_id, tiny_settings,
                               (caption_videos[0].parent,),
                               **{"worker.engine_stall_s": 3.0,
                                  "worker.engine_stall_exit_s": 300.0})
    core = _engine_core(vllm_backend)
    async with running_worker(settings, vllm_backend) as (worker, task):
        await wait_until(lambda: worker.health.ready, timeout_s=30)
        assert await _readyz(worker) == 200
        with _stopped(core):
            async with Publisher(kafka, topic=topics.input) as pub:
                report = await pub.publish_inputs([str(v) for v in caption_videos[:4]])
            # The stall clock starts when a request reaches the engine (after fetch+decode).
            await wait_until(lambda: vllm_backend.progress.in_flight > 0, timeout_s=60)
            stalled_at = time.monotonic()
            while await _readyz(worker) != 503:
                progress = vllm_backend.progress
                assert time.monotonic() - stalled_at < 3.0 + 4.0, (
                    f"not unready after the stall: in_flight={progress.in_flight} "
                    f"stalled_for={progress.stalled_for_s():.1f} s "
                    f"reason={worker.health.reason!r}")
                await asyncio.sleep(0.2)
            assert "engine" in worker.health.reason
            await asyncio.sleep(5)
            assert await _readyz(worker) == 503
            assert not task.done()
        captions = await read_topic(kafka, topics.output, expected=len(report.sent),
                                    timeout_s=120)
        await wait_until(lambda: worker.health.ready, timeout_s=30)
        await wait_all_committed(kafka, topics.input, group_id)
    assert {decode_caption_event(r.value).id for r in captions} == \
        {ev.id for ev, _ in report.sent}
    assert await read_topic(kafka, topics.dead_letter, expected=0, settle_s=0.3) == []


async def test_engine_stalled_past_the_exit_bound_exits_non_zero_with_nothing_committed(
        kafka, topics, group_id, vllm_backend, tiny_settings, caption_videos) -> None:
    settings = worker_settings(kafka, topics, group_id, tiny_settings,
                               (caption_videos[0].parent,),
                               **{"worker.engine_stall_s": 2.0,
                                  "worker.engine_stall_exit_s": 6.0})
    core = _engine_core(vllm_backend)
    async with running_worker(settings, vllm_backend, expect_exit_code=1) as (worker, task):
        await wait_until(lambda: worker.health.ready, timeout_s=30)
        with _stopped(core):
            async with Publisher(kafka, topic=topics.input) as pub:
                await pub.publish_inputs([str(v) for v in caption_videos[:3]])
            code = await asyncio.wait_for(asyncio.shield(task), 60)
        assert code == 1
        assert worker._fatal is not None and worker._fatal.code == ErrorCode.ENGINE_STALLED
    committed = await committed_offsets(kafka, topics.input, group_id)
    assert sum(max(0, c) for c in committed.values()) == 0
    assert await read_topic(kafka, topics.output, expected=0, settle_s=0.3) == []
    assert await read_topic(kafka, topics.dead_letter, expected=0, settle_s=0.3) == []


async def test_broker_killed_turns_the_dependency_gauge_and_readiness_down(
        tmp_path: Path, vllm_backend, tiny_settings, caption_videos) -> None:
    # Its own broker: this one dies.
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as broker:
        kafka = broker.kafka_settings()
        topics = TopicSettings(input="bd.in", output="bd.out", dead_letter="bd.dlq")
        await ensure_topics(kafka, (topics.input, topics.output, topics.dead_letter),
                            partitions=4)
        settings = worker_settings(
            kafka, topics, "bd", tiny_settings, (caption_videos[0].parent,),
            **{"worker.shutdown_grace_s": 5.0})
        settings = settings.model_copy(update={"kafka": kafka.model_copy(
            update={"request_timeout_ms": 5000})})
        async with running_worker(settings, vllm_backend, stop_timeout_s=90) as (worker, _):
            await wait_until(lambda: worker.health.ready, timeout_s=30)
            gauge = worker.metrics.dependency_up.labels("broker")
            assert gauge._value.get() == 1
            broker._proc.kill()
            killed_at = time.monotonic()
            while gauge._value.get() != 0 or await _readyz(worker) != 503:
                assert time.monotonic() - killed_at < 15, "broker death not noticed in 15 s"
                await asyncio.sleep(0.2)
            noticed_s = time.monotonic() - killed_at
            assert "broker" in worker.health.reason
            assert worker.metrics.dependency_outages.labels("broker")._value.get() == 1
    print(f"broker death noticed after {noticed_s:.1f} s")


async def test_poison_guard_stops_a_bad_deploy_from_draining_the_topic(
        kafka, topics, group_id, vllm_backend, tiny_settings, caption_videos,
        tmp_path: Path) -> None:
    settings = worker_settings(kafka, topics, group_id, tiny_settings, (tmp_path,),
                               **{"worker.poison_window_records": 10,
                                  "worker.dead_letter_max_ratio": 0.5,
                                  "worker.max_in_flight": 4, "worker.resume_in_flight": 1})
    # A bad deploy: the videos live outside the worker's allowed root.
    inputs = [str(caption_videos[i % 12]) for i in range(40)]
    async with Publisher(kafka, topic=topics.input) as pub:
        await pub.publish_inputs(inputs, id_from="uuid")
    async with running_worker(settings, vllm_backend) as (worker, _):
        await wait_until(lambda: worker._guard.tripped_code is not None, timeout_s=60)
        await asyncio.sleep(2)  # whatever was in flight has ended, or is held
        assert await _readyz(worker) == 503
        assert "video_forbidden" in worker.health.reason
        assert worker.metrics.poison_guard_tripped._value.get() == 1
        dead = await read_topic(kafka, topics.dead_letter, expected=10, settle_s=1.0)
        consumed = worker.metrics.events_consumed.labels(topics.input)._value.get()
    assert 10 <= len(dead) <= 10 + 4, f"{len(dead)} dead letters after the guard tripped"
    assert consumed < len(inputs), "the worker kept consuming after the guard tripped"
    committed = await committed_offsets(kafka, topics.input, group_id)
    assert sum(max(0, c) for c in committed.values()) <= len(dead)
