"""Delivery by what the dependency says, caused for real: a missing output topic at start-up
and at run time, an object store refusing the worker's credentials for longer than a
record's whole retry budget, a broker killed with outputs queued, SIGTERM to the worker's
whole process group while videos decode, and the number of POSTs one failing caption call
makes. Real broker, real videos, moto_server behind a loopback store, the real engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import psutil
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaTimeoutError, UnknownTopicOrPartitionError

from captionflow.broker import EmbeddedBroker
from captionflow.config import TopicSettings
from captionflow.consumer.publish import publish_error
from captionflow.errors import (
    BrokerUnavailableError,
    DependencyState,
    ErrorCode,
    PublishFailedError,
)
from captionflow.kafka import ensure_topics
from captionflow.producer import Publisher
from captionflow.schemas import decode_caption_event, decode_dead_letter_event
from captionflow.serving.openai_client import OpenAIBackend
from tests.support.kafka_helpers import (
    committed_offsets,
    read_topic,
    wait_all_committed,
    wait_until,
)
from tests.support.loopback import Loopback, s3_error
from tests.support.s3_fixtures import MotoServer
from tests.support.worker_fixtures import make_video, running_worker, worker_settings
from tests.test_worker_s3 import s3_overrides, stock_bucket

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session"),
              pytest.mark.timeout(600)]


async def _readyz(worker) -> tuple[int, str]:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{worker.http_port}/readyz", timeout=5)
    return response.status_code, response.text


def _spawn_worker(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        # Its own session and process group, as a pod's or a systemd unit's.
        return subprocess.Popen(
            [sys.executable, "-m", "captionflow", "serve", "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


# --- missing topics --------------------------------------------------------------------------


async def test_a_missing_output_topic_stops_the_worker_at_start_and_is_not_created(
        kafka, topics, group_id, tiny_settings, caption_videos, tmp_path: Path) -> None:
    missing = f"{topics.output}-typo"
    settings = worker_settings(kafka, topics, group_id, tiny_settings,
                               (caption_videos[0].parent,), **{"topics.output": missing})
    config = tmp_path / "worker.json"
    config.write_bytes(orjson.dumps(settings.model_dump(mode="json")))
    log = tmp_path / "worker.log"
    proc = _spawn_worker(config, log)
    try:
        code = await asyncio.to_thread(proc.wait, 120)
    finally:
        _kill_group(proc)
    text = log.read_text()
    assert code == 2, text[-3000:]
    flat = "".join(text.split())  # the console wraps long lines
    assert f"topics.output='{missing}'" in flat, text[-3000:]
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        assert missing not in await admin.list_topics(), "the start-up check created the topic"
    finally:
        await admin.close()


async def test_what_the_cluster_says_on_produce_decides_fatal_or_outage() -> None:
    assert isinstance(publish_error(UnknownTopicOrPartitionError(), "t", "k"), PublishFailedError)
    # aiokafka's accumulator expiring queued batches: the broker is away, not the topic.
    timed_out = publish_error(KafkaTimeoutError(), "t", "k")
    assert isinstance(timed_out, BrokerUnavailableError)
    assert timed_out.state is DependencyState.DOWN


async def test_an_unknown_topic_on_produce_is_fatal_and_commits_nothing_unpublished(
        kafka, topics, group_id, vllm_backend, tiny_settings, caption_videos) -> None:
    """Tansu creates a topic on produce and acknowledges produce to a deleted one, so the
    run-time path is shown with aiokafka's own error raised from the worker's producer."""
    settings = worker_settings(kafka, topics, group_id, tiny_settings,
                               (caption_videos[0].parent,),
                               **{"worker.max_in_flight": 4, "worker.resume_in_flight": 1})
    published_ok = 2
    sends: list[str] = []
    async with running_worker(settings, vllm_backend, expect_exit_code=1) as (worker, task):
        producer = worker._publisher._producer
        real_send = producer.send_and_wait

        async def send_and_wait(topic, value=None, key=None, **kw):
            sends.append(topic)
            if sends.count(topic) > published_ok:
                raise UnknownTopicOrPartitionError()
            return await real_send(topic, value, key=key, **kw)

        producer.send_and_wait = send_and_wait
        async with Publisher(kafka, topic=topics.input) as pub:
            await pub.publish_inputs([str(v) for v in caption_videos[:8]], id_from="uuid")
        code = await asyncio.wait_for(asyncio.shield(task), 120)
        assert code == 1
        assert worker._fatal is not None and worker._fatal.code == ErrorCode.PUBLISH_FAILED
        assert "topics.output" in str(worker._fatal)
    # No busy loop: each failed record tried once, the worker stopped on the first.
    assert sends.count(topics.output) <= published_ok + settings.worker.max_in_flight
    captions = await read_topic(kafka, topics.output, expected=published_ok, settle_s=0.5)
    assert len(captions) == published_ok
    done = {(c.source.partition, c.source.offset)
            for c in map(decode_caption_event, (r.value for r in captions))}
    committed = await committed_offsets(kafka, topics.input, group_id)
    for partition, offset in committed.items():
        past = [o for o in range(max(0, offset)) if (partition, o) not in done]
        assert past == [], f"partition {partition} committed {offset} past unpublished {past}"
    assert await read_topic(kafka, topics.dead_letter, expected=0, settle_s=0.2) == []


# --- refused credentials ---------------------------------------------------------------------


async def test_a_store_refusing_the_workers_credentials_writes_no_dead_letters(
        kafka, topics, group_id, vllm_backend, tiny_settings, caption_videos,
        s3_server: MotoServer) -> None:
    """The store answers 403 InvalidAccessKeyId to everything for REFUSE_S, far longer than
    a record's whole retry budget (max_attempts 3, 50 ms backoff: the records were
    dead-lettered within a second before), then accepts the same credentials."""
    refuse_s = 8.0
    refusing = True
    store = Loopback(lambda method, path: s3_error("InvalidAccessKeyId") if refusing else None,
                     upstream=s3_server.endpoint_url)
    try:
        urls, _, _ = stock_bucket(s3_server, caption_videos[:3])
        overrides = {**s3_overrides(s3_server), "video.s3_endpoint_url": store.url,
                     "video.s3_max_attempts": 1, "worker.retry_backoff_ms": 50,
                     "worker.probe_backoff_initial_ms": 200, "worker.probe_backoff_max_ms": 1000}
        settings = worker_settings(kafka, topics, group_id, tiny_settings,
                                   (caption_videos[0].parent,), **overrides)
        async with Publisher(kafka, topic=topics.input) as pub:
            report = await pub.publish_inputs(list(urls), id_from="path")
        async with running_worker(settings, vllm_backend) as (worker, _):
            started = time.monotonic()
            await wait_until(lambda: store.count("HEAD") >= 3, timeout_s=30)
            seen_503 = []
            while time.monotonic() - started < refuse_s:
                status, body = await _readyz(worker)
                seen_503.append(status == 503 and "object_store" in body
                                and "AWS_ACCESS_KEY_ID" in body)
                await asyncio.sleep(0.5)
            gauge = worker.metrics.dependency_misconfigured.labels("object_store")._value.get()
            assert await read_topic(kafka, topics.dead_letter, expected=0, settle_s=0.1) == []
            assert seen_503[-1] and sum(seen_503) >= len(seen_503) - 2, seen_503
            assert gauge == 1
            refusing = False
            records = await read_topic(kafka, topics.output, expected=3, timeout_s=120)
            await wait_all_committed(kafka, topics.input, group_id)
            await wait_until(lambda: worker.health.ready, timeout_s=15)
            assert worker.metrics.dependency_misconfigured.labels(
                "object_store")._value.get() == 0
    finally:
        store.close()
    assert {decode_caption_event(r.value).id for r in records} == {ev.id for ev, _ in report.sent}
    assert await read_topic(kafka, topics.dead_letter, expected=0, settle_s=0.3) == []


# --- the broker killed with outputs queued ---------------------------------------------------


async def test_broker_killed_with_outputs_queued_pauses_instead_of_publish_failed(
        tmp_path: Path, vllm_backend, tiny_settings, caption_videos,
        caplog: pytest.LogCaptureFixture) -> None:
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as broker:
        kafka = broker.kafka_settings().model_copy(update={"request_timeout_ms": 2000})
        topics = TopicSettings(input="qb.in", output="qb.out", dead_letter="qb.dlq")
        await ensure_topics(kafka, (topics.input, topics.output, topics.dead_letter),
                            partitions=4)
        settings = worker_settings(kafka, topics, "qb", tiny_settings,
                                   (caption_videos[0].parent,),
                                   **{"worker.shutdown_grace_s": 2.0,
                                      "worker.broker_down_exit_s": 0.0,
                                      # Few requests in the engine at once: outputs finish
                                      # one by one, so many events are still in flight
                                      # when the first one is published.
                                      "worker.max_in_engine": 2})
        # Each caption echoes 20 KB of metadata, more than aiokafka's batch (16 KiB): a
        # second output for a partition waits for the first batch to drain, and with the
        # broker gone that wait ends in KafkaTimeoutError after request_timeout_ms.
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
        await producer.start()
        try:
            for i in range(24):
                await producer.send_and_wait(topics.input, orjson.dumps({
                    "id": f"q{i}", "video": [str(caption_videos[i % 12])],
                    "metadata": {"pad": "m" * 20_000}}), key=f"q{i}".encode())
        finally:
            await producer.stop()
        caplog.set_level(logging.WARNING, logger="captionflow.consumer.service")
        async with running_worker(settings, vllm_backend, stop_timeout_s=90) as (worker, task):
            # The worker's own count, not a reader of the topic: a reader's group join takes
            # seconds, long enough for every event to finish before the kill.
            published = worker.metrics.events_captioned
            await wait_until(lambda: published._value.get() >= 1
                             and worker._tracker.in_flight() >= 3, timeout_s=120)
            in_flight = worker._tracker.in_flight()
            broker._proc.kill()
            assert in_flight >= 3, f"only {in_flight} events in flight at the kill"
            # Past request_timeout_ms: queued batches have expired (KafkaTimeoutError).
            await wait_until(lambda: "publish waits for the broker" in caplog.text,
                             timeout_s=30)
            await asyncio.sleep(3 * kafka.request_timeout_ms / 1000)
            assert not task.done() and worker._fatal is None, worker._fatal
            status, body = await _readyz(worker)
            assert status == 503 and "broker" in body
    waits = [r.getMessage() for r in caplog.records if "publish waits" in r.getMessage()]
    assert any("KafkaTimeoutError" in m for m in waits), \
        f"no queued batch expired: {sorted({m.split(': ')[-1][:40] for m in waits})}"


# --- SIGTERM to the whole process group ------------------------------------------------------


async def test_sigterm_to_the_process_group_while_decoding_blames_no_record(
        kafka, topics, group_id, vllm_backend, tiny_settings, tmp_path: Path) -> None:
    root = tmp_path / "videos"
    root.mkdir()
    # Large enough that decodes are running when the signal comes.
    videos = [make_video(root / f"long{i}.mp4", seed=i, frames=240, fps=24, width=640,
                         height=480) for i in range(3)]
    serving = tiny_settings.model_copy(update={"backend": "transformers"})
    settings = worker_settings(kafka, topics, group_id, serving, (root,),
                               **{"worker.shutdown_grace_s": 1.0, "video.decode_workers": 2,
                                  "video.max_frames": 8, "worker.max_in_flight": 8,
                                  "worker.resume_in_flight": 4})
    config = tmp_path / "worker.json"
    config.write_bytes(orjson.dumps(settings.model_dump(mode="json")))
    async with Publisher(kafka, topic=topics.input) as pub:
        report = await pub.publish_inputs([str(videos[i % 3]) for i in range(10)],
                                          id_from="uuid")
    ids = {ev.id for ev, _ in report.sent}
    log = tmp_path / "worker.log"
    proc = _spawn_worker(config, log)
    try:
        await _busy_decoder(proc, log)
        os.killpg(proc.pid, signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 60)
        assert code == 0, log.read_text()[-3000:]
    finally:
        _kill_group(proc)
    assert await read_topic(kafka, topics.dead_letter, expected=0, settle_s=0.3) == [], \
        log.read_text()[-3000:]
    first = {decode_caption_event(r.value).id
             for r in await read_topic(kafka, topics.output, expected=0, settle_s=0.3)}
    assert first < ids, "every event finished before the signal: nothing was in flight"
    # The next owner gets what was in flight: offsets were not committed past it.
    async with running_worker(settings.model_copy(update={"serving": tiny_settings}),
                              vllm_backend) as _:
        await read_topic(kafka, topics.output, expected=len(ids), timeout_s=180)
        await wait_all_committed(kafka, topics.input, group_id)
    # Read again: the first read may have stopped at len(ids) records with a duplicate among
    # them. Every input offset is committed now, and a worker commits only what it published.
    records = await read_topic(kafka, topics.output, expected=len(ids), settle_s=0.3)
    assert {decode_caption_event(r.value).id for r in records} >= ids
    assert await read_topic(kafka, topics.dead_letter, expected=0, settle_s=0.3) == []


async def _busy_decoder(proc: subprocess.Popen[bytes], log: Path) -> psutil.Process:
    """A decoder child of the worker that is using CPU now (decoding a video)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        with contextlib.suppress(psutil.Error):
            children = [c for c in psutil.Process(proc.pid).children(recursive=True)
                        if "decoder_process" in " ".join(c.cmdline())]
            before = {c.pid: sum(c.cpu_times()[:2]) for c in children}
            await asyncio.sleep(0.2)
            for c in children:
                if sum(c.cpu_times()[:2]) - before[c.pid] > 0.05:
                    return c
        await asyncio.sleep(0.1)
    raise AssertionError(f"no decoder got busy:\n{log.read_text()[-3000:]}")


# --- how many requests one failing call makes ------------------------------------------------


async def test_one_failing_caption_call_makes_the_documented_number_of_posts(
        kafka, topics, group_id, tiny_settings, caption_videos) -> None:
    """docs/errors.md: worker.max_attempts * (serving.openai_max_retries + 1) POSTs."""
    def rule(method: str, path: str):
        if method == "GET" and path.endswith("/models"):
            return 200, {"Content-Type": "application/json"}, b'{"data": []}'
        return 500, {"Content-Type": "application/json"}, b'{"error": {"message": "boom"}}'

    with Loopback(rule) as server:
        max_attempts, max_retries = 3, 1
        serving = tiny_settings.model_copy(update={
            "backend": "openai", "openai_base_url": f"{server.url}/v1",
            "openai_max_retries": max_retries, "openai_retry_backoff_ms": 10})
        settings = worker_settings(kafka, topics, group_id, serving,
                                   (caption_videos[0].parent,),
                                   **{"worker.max_attempts": max_attempts,
                                      "worker.retry_backoff_ms": 10})
        backend = OpenAIBackend(serving)
        await backend.start()
        try:
            async with Publisher(kafka, topic=topics.input) as pub:
                await pub.publish_inputs([str(caption_videos[0])], id_from="uuid")
            async with running_worker(settings, backend) as _:
                [dead] = await read_topic(kafka, topics.dead_letter, expected=1, timeout_s=60)
        finally:
            await backend.close()
        posts = server.count("POST", "/chat/completions")
    letter = decode_dead_letter_event(dead.value)
    assert letter.error.code == ErrorCode.ENGINE_UNAVAILABLE
    assert letter.error.attempts == max_attempts
    assert posts == max_attempts * (max_retries + 1)


async def test_acl_and_sasl_refusals_while_running_are_misconfigured_outages() -> None:
    """Tansu has no ACLs or SASL (FACTS): the classification of aiokafka's errors is shown,
    the worker's waiting on it is the gate's (test_delivery_units)."""
    from aiokafka.errors import GroupAuthorizationFailedError, TopicAuthorizationFailedError

    from captionflow.kafka import refusal

    for error in (TopicAuthorizationFailedError(), GroupAuthorizationFailedError()):
        assert isinstance(publish_error(error, "t", "k"), BrokerUnavailableError)
        outage = refusal(error, "polling")
        assert outage is not None and outage.state is DependencyState.MISCONFIGURED
        assert "kafka.sasl_username" in str(outage)
    assert refusal(KafkaTimeoutError(), "polling") is None
