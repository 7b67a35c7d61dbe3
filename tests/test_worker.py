"""The worker end to end, in-process: real broker, real videos, the real vLLM CPU engine."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import orjson
import pytest

from captionflow.errors import EngineDeadError, ErrorCode
from captionflow.producer import Publisher
from captionflow.producer.sources import expand
from captionflow.schemas import decode_caption_event, decode_dead_letter_event
from captionflow.serving.base import CaptionBackend, CaptionRequest, CaptionResult
from tests.support.kafka_helpers import committed_offsets, read_topic, wait_all_committed
from tests.support.worker_fixtures import reference_captions, running_worker, worker_settings

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]


async def test_200_events_become_their_own_captions(kafka, topics, group_id, vllm_backend,
                                                    tiny_settings, caption_videos) -> None:
    settings = worker_settings(kafka, topics, group_id, tiny_settings,
                               (caption_videos[0].parent,))
    expected = await reference_captions(vllm_backend, settings, caption_videos)
    assert len(set(expected.values())) >= len(caption_videos) // 2, \
        "videos must caption differently for mix-ups to be visible"
    inputs = [str(caption_videos[i % len(caption_videos)]) for i in range(200)]
    async with Publisher(kafka, topic=topics.input) as pub:
        report = await pub.publish_inputs(inputs, id_from="uuid")
    assert len(report.sent) == 200
    assert len({meta.partition for _, meta in report.sent}) == 4
    sent = {ev.id: ev.reference for ev, _ in report.sent}

    async with running_worker(settings, vllm_backend) as (worker, _):
        records = await read_topic(kafka, topics.output, expected=200, timeout_s=240)
        await wait_all_committed(kafka, topics.input, group_id)
        batches = worker.metrics.batch_size.collect()[0].samples
    captions = [decode_caption_event(r.value) for r in records]
    assert len(captions) == 200
    assert {c.id for c in captions} == set(sent)
    for record, c in zip(records, captions, strict=True):
        assert record.key == c.id.encode()
        assert c.video == [sent[c.id]]
        assert c.caption == expected[sent[c.id]], f"event {c.id} got another video's caption"
        assert c.model == str(tiny_settings.model)
        assert c.conversation[0].value == "Please describe the video in detail."
        assert c.usage.completion_tokens > 0 and c.video_info.frames_sampled == 4
    assert await read_topic(kafka, topics.dead_letter, expected=0, settle_s=0.2) == []
    count = next(s.value for s in batches if s.name.endswith("_count"))
    total = next(s.value for s in batches if s.name.endswith("_sum"))
    assert total == 200 and count < 200, "requests were never micro-batched"


async def test_bad_records_each_become_one_dead_letter(kafka, topics, group_id, vllm_backend,
                                                       tiny_settings, caption_videos,
                                                       video_corpus, tmp_path: Path) -> None:
    root = caption_videos[0].parent
    settings = worker_settings(kafka, topics, group_id, tiny_settings, (root,),
                               **{"kafka.max_event_bytes": 2048})
    corrupt = next(f for f in video_corpus.values()
                   if f.error == ErrorCode.VIDEO_UNREADABLE)
    # The corpus lives outside the allowed root: copy the corrupt file in.
    corrupt_copy = root / "corrupt-copy.mp4"
    corrupt_copy.write_bytes(Path(corrupt.path).read_bytes())
    good = [str(v) for v in caption_videos[:3]]
    bad: list[tuple[bytes, ErrorCode]] = [
        (b"{not json", ErrorCode.MALFORMED_JSON),
        (b'{"id": "s1", "video": ["a.mp4", "b.mp4"]}', ErrorCode.SCHEMA_INVALID),
        (b'{"id": "s2", "vidoe": "a.mp4"}', ErrorCode.SCHEMA_INVALID),
        (orjson.dumps({"id": "m1", "video": str(root / "missing.mp4")}),
         ErrorCode.VIDEO_NOT_FOUND),
        (b'{"id": "f1", "video": "/etc/passwd"}', ErrorCode.VIDEO_FORBIDDEN),
        (orjson.dumps({"id": "f2", "video": str(root / ".." / "escape.mp4")}),
         ErrorCode.VIDEO_FORBIDDEN),
        (orjson.dumps({"id": "c1", "video": str(corrupt_copy)}), ErrorCode.VIDEO_UNREADABLE),
        (orjson.dumps({"id": "o1", "video": good[0], "metadata": {"pad": "x" * 4096}}),
         ErrorCode.PAYLOAD_TOO_LARGE),
    ]
    async with Publisher(kafka, topic=topics.input) as pub:
        for i, (payload, _) in enumerate(bad):
            await pub._producer.send_and_wait(topics.input, payload, partition=i % 4)
            await pub.send_many([c.event for c in expand([good[i % 3]]) if c.event])
    consumed = len(bad) * 2
    async with running_worker(settings, vllm_backend):
        captions = await read_topic(kafka, topics.output, expected=len(bad), timeout_s=120)
        dead = await read_topic(kafka, topics.dead_letter, expected=len(bad), timeout_s=60)
        await wait_all_committed(kafka, topics.input, group_id)
    assert len(captions) + len(dead) == consumed
    assert len(captions) == len(bad)
    letters = [decode_dead_letter_event(r.value) for r in dead]
    by_payload = {dl.payload: dl for dl in letters}
    for payload, code in bad:
        dl = by_payload[payload.decode()]
        assert dl.error.code == code, (payload[:60], dl.error)
        assert dl.source is not None and dl.source.topic == topics.input
        assert dl.error.message
        sent_id = orjson.loads(payload).get("id") if code != ErrorCode.MALFORMED_JSON else None
        assert dl.id == sent_id


class _DyingBackend(CaptionBackend):
    """The shared engine, until it "dies" after ``survive`` requests."""

    name = "dying"

    def __init__(self, inner: CaptionBackend, survive: int) -> None:
        self.inner, self.left = inner, survive

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def healthy(self) -> bool:
        return self.left > 0

    def model_info(self) -> dict:
        return self.inner.model_info()

    async def caption(self, request: CaptionRequest) -> CaptionResult:
        self.left -= 1
        if self.left < 0:
            raise EngineDeadError("engine process died")
        return await self.inner.caption(request)


async def test_dead_engine_stops_the_worker_with_nothing_unfinished_committed(
        kafka, topics, group_id, vllm_backend, tiny_settings, caption_videos) -> None:
    settings = worker_settings(kafka, topics, group_id, tiny_settings,
                               (caption_videos[0].parent,),
                               **{"worker.max_batch_size": 1, "worker.max_in_flight": 2,
                                  "worker.resume_in_flight": 1})
    async with Publisher(kafka, topic=topics.input) as pub:
        await pub.publish_inputs([str(v) for v in caption_videos[:10]])
    async with running_worker(settings, _DyingBackend(vllm_backend, survive=3),
                              expect_exit_code=1) as (_, task):
        code = await asyncio.wait_for(task, 60)
    assert code == 1
    captions = await read_topic(kafka, topics.output, expected=3, settle_s=0.3)
    dead = await read_topic(kafka, topics.dead_letter, expected=0, settle_s=0.2)
    assert dead == [], "a dead engine is not the event's fault: no dead letters"
    committed = await committed_offsets(kafka, topics.input, group_id)
    assert sum(max(0, c) for c in committed.values()) <= len(captions) < 10


async def test_backpressure_bounds_in_flight_and_loses_nothing(
        kafka, topics, group_id, vllm_backend, tiny_settings, caption_videos) -> None:
    settings = worker_settings(kafka, topics, group_id, tiny_settings,
                               (caption_videos[0].parent,),
                               **{"worker.max_in_flight": 4, "worker.resume_in_flight": 1,
                                  "worker.max_poll_records": 4})
    async with Publisher(kafka, topic=topics.input) as pub:
        await pub.publish_inputs([str(caption_videos[i % 12]) for i in range(40)])
    peak, paused_seen = 0, 0
    async with running_worker(settings, vllm_backend) as (worker, _):
        reader = asyncio.create_task(read_topic(kafka, topics.output, expected=40,
                                                timeout_s=180))
        while not reader.done():
            peak = max(peak, worker._tracker.in_flight())
            paused_seen = max(paused_seen, int(worker.metrics.paused_partitions._value.get()))
            await asyncio.sleep(0.005)
        records = reader.result()
    assert len({decode_caption_event(r.value).id for r in records}) == 40
    assert peak <= 4, f"in-flight reached {peak} with max_in_flight=4"
    assert paused_seen > 0, "partitions were never paused"


async def test_two_workers_one_stops_midstream_every_event_captioned(
        kafka, topics, group_id, vllm_backend, tiny_settings, caption_videos) -> None:
    settings = worker_settings(kafka, topics, group_id, tiny_settings,
                               (caption_videos[0].parent,))
    async with Publisher(kafka, topic=topics.input) as pub:
        report = await pub.publish_inputs([str(caption_videos[i % 12]) for i in range(60)])
    ids = {ev.id for ev, _ in report.sent}
    async with running_worker(settings, vllm_backend) as (w1, t1), \
            running_worker(settings, vllm_backend) as (w2, t2):
        await read_topic(kafka, topics.output, expected=15, timeout_s=120, settle_s=0)
        assert w1._tracker.partitions() and w2._tracker.partitions(), "group did not split"
        w2.stop()
        assert await asyncio.wait_for(t2, 60) == 0
        records = await read_topic(kafka, topics.output, expected=60, timeout_s=180)
        await wait_all_committed(kafka, topics.input, group_id)
    got = collections.Counter(decode_caption_event(r.value).id for r in records)
    assert set(got) == ids
    assert w1.metrics.rebalances.labels("assigned")._value.get() >= 2


async def test_retriable_fetch_failure_is_retried_then_captioned(
        kafka, topics, group_id, vllm_backend, tiny_settings, caption_videos,
        http_server) -> None:
    settings = worker_settings(kafka, topics, group_id, tiny_settings,
                               (caption_videos[0].parent,),
                               **{"video.fetch_allowed_networks": ("127.0.0.1/32",),
                                  "worker.retry_backoff_ms": 10})
    served = http_server.serve_file
    hits = {"/flaky.mp4": 0}
    served("/ok.mp4", caption_videos[0])
    ok_route = http_server.routes["/ok.mp4"]

    def flaky(h) -> None:
        hits["/flaky.mp4"] += 1
        if hits["/flaky.mp4"] == 1:
            h.send_error(503)
        else:
            ok_route(h)

    http_server.routes["/flaky.mp4"] = flaky
    http_server.routes["/down.mp4"] = lambda h: h.send_error(503)
    async with Publisher(kafka, topic=topics.input) as pub:
        report = await pub.publish_inputs([http_server.url("/flaky.mp4"),
                                           http_server.url("/down.mp4")], id_from="path")
    flaky_id, down_id = (ev.id for ev, _ in report.sent)
    async with running_worker(settings, vllm_backend) as (worker, _):
        [caption] = await read_topic(kafka, topics.output, expected=1, timeout_s=120)
        [dead] = await read_topic(kafka, topics.dead_letter, expected=1, timeout_s=60)
        retried = worker.metrics.events_retried.labels("fetch_failed")._value.get()
    ev = decode_caption_event(caption.value)
    assert (ev.id, ev.attempts, hits["/flaky.mp4"]) == (flaky_id, 2, 2)
    dl = decode_dead_letter_event(dead.value)
    assert dl.id == down_id and dl.error.code == ErrorCode.FETCH_FAILED
    assert dl.error.retriable and dl.error.attempts == settings.worker.max_attempts
    assert retried == 1 + (settings.worker.max_attempts - 1)
