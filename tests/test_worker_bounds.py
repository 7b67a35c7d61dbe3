"""Bounded work per partition, probes without metrics, and held records under a revoke, on the
real parts: the embedded broker, a real in-process worker on the shared vLLM CPU engine, a
loopback HTTP server trickling a real video, real dead letters."""

from __future__ import annotations

import asyncio
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from captionflow.config import TopicSettings
from captionflow.kafka import ensure_topics
from captionflow.schemas import decode_caption_event, decode_dead_letter_event
from tests.support.broker_fixtures import unique_name
from tests.support.kafka_helpers import (
    committed_offsets,
    read_topic,
    wait_all_committed,
    wait_until,
)
from tests.support.video_fixtures import LoopbackServer
from tests.support.worker_fixtures import running_worker, worker_settings

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session"),
              pytest.mark.timeout(300)]

BOUND = 20
FAST = 500


def trickle(server: LoopbackServer, path: str, video: Path, release: threading.Event) -> None:
    """Serve ``video`` one byte every 0.2 s after the first 64 until ``release`` is set,
    then the rest: a download that lasts exactly as long as the test needs."""
    data = video.read_bytes()

    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "video/mp4")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        sent = 64
        h.wfile.write(data[:sent])
        h.wfile.flush()
        while not release.wait(0.2) and sent < len(data) - 1:
            h.wfile.write(data[sent:sent + 1])
            h.wfile.flush()
            sent += 1
        h.wfile.write(data[sent:])

    server.routes[path] = route


async def produce(kafka, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, linger_ms=5)
    await producer.start()
    try:
        for value in values:
            await producer.send(topic, value)
        await producer.flush()
    finally:
        await producer.stop()


async def test_one_slow_record_holds_at_most_the_bound_above_the_commit_point(
        request, kafka, group_id, vllm_backend, tiny_settings, caption_videos,
        tmp_path: Path) -> None:
    base = unique_name(request, "t")
    topics = TopicSettings(input=f"{base}.in", output=f"{base}.out",
                           dead_letter=f"{base}.dlq", partitions=1)
    await ensure_topics(kafka, (topics.input, topics.output, topics.dead_letter), partitions=1)
    server, release = LoopbackServer(), threading.Event()
    server.thread.start()
    trickle(server, "/slow.mp4", caption_videos[0], release)
    # Offset 0 downloads for as long as the test holds it; 500 small events follow it on the
    # same partition, each a real dead letter in milliseconds (the file is absent): the
    # bound is about offsets, not about what the records become.
    values = [orjson.dumps({"id": "slow", "video": server.url("/slow.mp4")})] + [
        orjson.dumps({"id": f"fast-{i}", "video": str(tmp_path / f"missing-{i}.mp4")})
        for i in range(FAST)]
    await produce(kafka, topics.input, values)
    settings = worker_settings(
        kafka, topics, group_id, tiny_settings, (tmp_path,),
        **{"worker.max_uncommitted_per_partition": BOUND,
           "worker.dead_letter_max_ratio": 1.0,  # 500 alike dead letters are the point here
           "video.allowed_schemes": ("file", "http"),
           "video.fetch_allowed_networks": ("127.0.0.1/32",)})
    try:
        async with running_worker(settings, vllm_backend) as (worker, _):
            metrics = worker.metrics

            def age_s() -> float:
                return metrics.registry.get_sample_value(
                    "captionflow_oldest_unfinished_record_age_seconds",
                    {"topic": topics.input, "partition": "0"}) or 0.0

            consumed = metrics.events_consumed.labels(topics.input)
            await wait_until(lambda: consumed._value.get() >= BOUND, timeout_s=60)
            await asyncio.sleep(3)  # long enough for more to be fetched, were it allowed
            held_for_s = 3.0
            dead = await read_topic(kafka, topics.dead_letter, expected=BOUND - 1,
                                    settle_s=1.0)
            # Offset 0 and the 19 records after it: the partition is paused, nothing
            # committed past the slow record.
            assert consumed._value.get() == BOUND
            assert len(dead) == BOUND - 1
            assert metrics.paused_partitions._value.get() == 1
            assert (await committed_offsets(kafka, topics.input, group_id)).get(0, -1) <= 0
            assert age_s() >= held_for_s
            started_at = time.monotonic()
            release.set()
            await wait_all_committed(kafka, topics.input, group_id, timeout_s=90)
            drained_s = time.monotonic() - started_at
            await wait_until(lambda: age_s() == 0.0 and
                             metrics.paused_partitions._value.get() == 0, timeout_s=5)
        captions = await read_topic(kafka, topics.output, expected=1)
        dead = await read_topic(kafka, topics.dead_letter, expected=FAST)
    finally:
        release.set()
        server.httpd.shutdown()
        server.httpd.server_close()
    assert [decode_caption_event(r.value).id for r in captions] == ["slow"]
    ids = [decode_dead_letter_event(r.value).id for r in dead]
    assert sorted(ids) == sorted(f"fast-{i}" for i in range(FAST)), "lost or duplicated"
    print(f"{FAST} records behind a held one drained in {drained_s:.1f} s after it finished")


async def test_probes_answer_with_metrics_disabled(
        kafka, topics, group_id, vllm_backend, tiny_settings, caption_videos) -> None:
    settings = worker_settings(kafka, topics, group_id, tiny_settings,
                               (caption_videos[0].parent,), **{"metrics.enabled": False})
    async with running_worker(settings, vllm_backend) as (worker, _):
        url = f"http://127.0.0.1:{worker.http_port}"
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            await wait_until(lambda: worker.health.ready, timeout_s=30)
            assert (await client.get("/healthz")).status_code == 200
            ready = await client.get("/readyz")
            assert ready.status_code == 200 and ready.text == "ready\n"
            assert (await client.get("/metrics")).status_code == 404


async def test_a_revoke_does_not_wait_the_grace_on_records_the_poison_guard_holds(
        kafka, topics, group_id, vllm_backend, tiny_settings, tmp_path: Path) -> None:
    grace_s = 20.0
    server = LoopbackServer()
    server.thread.start()

    def gone_slowly(h: BaseHTTPRequestHandler) -> None:
        time.sleep(2)
        h.send_error(404)

    server.routes["/gone.mp4"] = gone_slowly
    settings = worker_settings(
        kafka, topics, group_id, tiny_settings, (tmp_path,),
        **{"worker.poison_window_records": 4, "worker.dead_letter_max_ratio": 0.5,
           "worker.revoke_grace_s": grace_s,
           "worker.max_in_flight": 16, "worker.resume_in_flight": 1,
           "video.allowed_schemes": ("file", "http"),
           "video.fetch_allowed_networks": ("127.0.0.1/32",)})
    # A bad deploy: every video is missing. Four fail at once and trip the guard; twelve
    # take 2 s to fail the same way, and are then held, uncommitted.
    values = [orjson.dumps({"id": f"fast-{i}", "video": str(tmp_path / f"m{i}.mp4")})
              for i in range(4)] + [
        orjson.dumps({"id": f"held-{i}", "video": server.url("/gone.mp4")})
        for i in range(12)]
    await produce(kafka, topics.input, values)
    try:
        async with running_worker(settings, vllm_backend) as (first, _):
            await wait_until(lambda: first._guard.tripped_code is not None, timeout_s=60)
            held_total = first.metrics.events_held.labels("video_not_found")
            await wait_until(lambda: held_total._value.get() > 0, timeout_s=30)
            await asyncio.sleep(0.5)
            held = int(held_total._value.get())
            revoked = first.metrics.rebalances.labels("revoked")
            before = revoked._value.get()
            joined_at = time.monotonic()
            # A second member joins: the first's partitions are revoked (eager protocol).
            async with running_worker(settings, vllm_backend) as (second, _):
                await wait_until(lambda: revoked._value.get() > before, timeout_s=60)
                await wait_until(lambda: second.metrics.assigned_partitions._value.get() > 0,
                                 timeout_s=60)
                rebalanced_s = time.monotonic() - joined_at
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
    assert rebalanced_s < grace_s / 2, f"the revoke waited {rebalanced_s:.1f} s"
    # Held records were never dead-lettered by the first worker: their offsets stayed open.
    print(f"{held} held records; the rebalance took {rebalanced_s:.1f} s "
          f"(revoke_grace_s={grace_s:g})")
