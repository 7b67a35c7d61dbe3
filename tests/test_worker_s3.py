"""s3:// references through the worker and batch mode: real broker, moto_server, the real
vLLM CPU engine. Objects are decoded straight from the store in ranged GETs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from captionflow.batch.job import run_file
from captionflow.errors import ErrorCode
from captionflow.producer import Publisher
from captionflow.schemas import decode_caption_event, decode_dead_letter_event
from captionflow.serving.base import CaptionBackend
from tests.support.kafka_helpers import read_topic
from tests.support.s3_fixtures import MotoServer
from tests.support.worker_fixtures import reference_captions, running_worker, worker_settings
from tests.test_batch_runner import batch_settings

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]


def s3_overrides(server: MotoServer) -> dict[str, Any]:
    # Every object read in ranges, none downloaded whole: the path the issue is about.
    return {"video.allowed_schemes": ("file", "s3"), "video.s3_endpoint_url": server.endpoint_url,
            "video.s3_addressing_style": "path", "video.s3_whole_object_max_bytes": 0,
            "video.s3_min_read_bytes": 4096}


def stock_bucket(server: MotoServer, videos: list[Path]) -> tuple[dict[str, Path], str, str]:
    """Upload ``videos``; return {url: local path}, a missing key's URL and the URL of an
    object in a bucket whose policy denies reads."""
    bucket = server.new_bucket("videos")
    client = server.client()
    urls = {}
    for video in videos:
        client.upload_file(str(video), bucket, f"in/{video.name}")
        urls[f"s3://{bucket}/in/{video.name}"] = video
    denied = server.new_bucket("denied")
    client.upload_file(str(videos[0]), denied, "secret.mp4")
    client.put_bucket_policy(Bucket=denied, Policy=json.dumps({
        "Version": "2012-10-17", "Statement": [{
            "Effect": "Deny", "Principal": "*", "Action": "s3:GetObject",
            "Resource": f"arn:aws:s3:::{denied}/*"}]}))
    return urls, f"s3://{bucket}/in/missing.mp4", f"s3://{denied}/secret.mp4"


async def test_worker_captions_s3_objects_and_dead_letters_missing_and_denied(
        kafka, topics, group_id, vllm_backend: CaptionBackend, tiny_settings,
        caption_videos: list[Path], s3_server: MotoServer) -> None:
    settings = worker_settings(kafka, topics, group_id, tiny_settings,
                               (caption_videos[0].parent,), **s3_overrides(s3_server))
    urls, missing, denied = stock_bucket(s3_server, caption_videos[:3])
    expected = await reference_captions(vllm_backend, settings, caption_videos[:3])
    async with Publisher(kafka, topic=topics.input) as pub:
        report = await pub.publish_inputs([*urls, missing, denied], id_from="path")
    assert len(report.sent) == 5
    ids = {ev.reference: ev.id for ev, _ in report.sent}

    async with running_worker(settings, vllm_backend) as (worker, _):
        records = await read_topic(kafka, topics.output, expected=3, timeout_s=180)
        dead = await read_topic(kafka, topics.dead_letter, expected=2, timeout_s=60)
        histogram = {s.name: s.value for s in worker.metrics.video_bytes_read.collect()[0].samples
                     if s.name.endswith(("_sum", "_count"))}
    captions = [decode_caption_event(r.value) for r in records]
    assert sorted(c.video[0] for c in captions) == sorted(urls)
    for c in captions:
        local = urls[c.video[0]]
        assert c.caption == expected[str(local)], "the object decoded to other frames"
        assert 0 < c.video_info.bytes_read <= 2 * local.stat().st_size
    # The metric observed exactly the bytes the caption events report.
    assert histogram["captionflow_video_read_bytes_count"] == 3
    assert histogram["captionflow_video_read_bytes_sum"] == sum(
        c.video_info.bytes_read for c in captions)
    letters = {dl.id: dl.error.code for dl in (decode_dead_letter_event(r.value) for r in dead)}
    assert letters == {ids[missing]: ErrorCode.VIDEO_NOT_FOUND,
                       ids[denied]: ErrorCode.VIDEO_FORBIDDEN}


async def test_batch_rows_with_s3_references(tmp_path: Path, vllm_backend: CaptionBackend,
                                             tiny_settings, caption_videos: list[Path],
                                             s3_server: MotoServer,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    urls, missing, denied = stock_bucket(s3_server, caption_videos[3:5])
    rows = [{"video": [url], "conversation": [{"from": "human", "value": ""}]}
            for url in [*urls, missing, denied]]
    (tmp_path / "rows.json").write_bytes(orjson.dumps(rows))
    base = batch_settings(tiny_settings, caption_videos[0].parent)
    # Batch mode allows s3:// by itself (the user's own credentials); only the endpoint here.
    settings = base.model_copy(update={"video": base.video.model_copy(update={
        "s3_endpoint_url": s3_server.endpoint_url, "s3_addressing_style": "path",
        "s3_whole_object_max_bytes": 0})})
    assert "s3" not in settings.video.allowed_schemes
    out_path = tmp_path / "out.json"
    report = await run_file("rows.json", out_path, cache_type="json", settings=settings,
                            backend=vllm_backend, concurrency=2)
    assert (report.captioned, report.failed_total) == (2, 2)
    out = orjson.loads(out_path.read_bytes())
    expected = await reference_captions(vllm_backend, settings, caption_videos[3:5])
    for row, local in zip(out[:2], urls.values(), strict=True):
        assert row["caption"] == expected[str(local)]
    assert [r["error"]["code"] for r in out[2:]] == [ErrorCode.VIDEO_NOT_FOUND,
                                                      ErrorCode.VIDEO_FORBIDDEN]


async def test_store_stopped_writes_no_dead_letters_and_resumes(
        kafka, topics, group_id, vllm_backend: CaptionBackend, tiny_settings,
        caption_videos: list[Path], tmp_path: Path, s3_env: None) -> None:
    """The store is down when the events arrive: the worker waits (no dead letter), and
    captions every event once the store answers again."""
    server = MotoServer(tmp_path / "moto.log").start()
    try:
        settings = worker_settings(
            kafka, topics, group_id, tiny_settings, (caption_videos[0].parent,),
            **s3_overrides(server), **{"video.s3_max_attempts": 1,
                                       "video.fetch_connect_timeout_s": 1.0,
                                       "worker.probe_timeout_s": 2.0,
                                       "worker.probe_backoff_max_ms": 1000})
        videos = caption_videos[5:8]
        urls, _, _ = stock_bucket(server, videos)
        expected = await reference_captions(vllm_backend, settings, videos)
        server.stop()
        async with Publisher(kafka, topic=topics.input) as pub:
            report = await pub.publish_inputs(list(urls), id_from="path")
        assert len(report.sent) == 3
        async with running_worker(settings, vllm_backend) as (worker, _):
            # Long enough for every event to have failed its fetch several times over.
            assert await read_topic(kafka, topics.dead_letter, expected=0, settle_s=6) == []
            assert await read_topic(kafka, topics.output, expected=0, settle_s=0.1) == []
            # Back, empty (moto keeps nothing): the same objects again, at the same endpoint.
            server.start()
            for url, video in urls.items():
                bucket, key = url[5:].split("/", 1)
                client = server.client()
                if not client.list_buckets()["Buckets"]:
                    client.create_bucket(Bucket=bucket)
                client.upload_file(str(video), bucket, key)
            records = await read_topic(kafka, topics.output, expected=3, timeout_s=120)
            outages = {s.labels.get("dependency"): s.value
                       for s in worker.metrics.registry.collect()
                       for s in s.samples if s.name == "captionflow_dependency_outages_total"}
        captions = [decode_caption_event(r.value) for r in records]
        assert sorted(c.video[0] for c in captions) == sorted(urls)
        for c in captions:
            assert c.caption == expected[str(urls[c.video[0]])]
        assert await read_topic(kafka, topics.dead_letter, expected=0, settle_s=0.5) == []
        assert outages.get("object_store", 0) >= 1
    finally:
        server.stop()
