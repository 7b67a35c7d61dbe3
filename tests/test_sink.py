"""`captionflow sink` in this process, on the embedded broker and the moto S3 server: caption
events produced with the project's own codec land as a dataset that pyarrow reads back."""

from __future__ import annotations

import asyncio
import gzip
import time
import urllib.request

import orjson
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from captionflow.schemas.codec import encode
from captionflow.schemas.events import DeadLetterEvent, ErrorInfo
from captionflow.sink.layout import FileName
from captionflow.sink.read import open_dataset
from tests.support.kafka_helpers import wait_all_committed, wait_until
from tests.support.s3_fixtures import S3_ENV
from tests.support.sink_helpers import STATUSES, caption_event, produce, running_sink, sink_settings

pytestmark = pytest.mark.timeout(120)


def s3_filesystem(endpoint_url: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(access_key=S3_ENV["AWS_ACCESS_KEY_ID"],
                             secret_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
                             region=S3_ENV["AWS_REGION"],
                             endpoint_override=endpoint_url.removeprefix("http://"),
                             scheme="http")


def test_a_thousand_captions_land_in_s3_as_parquet(kafka, topics, group_id, s3_server,
                                                  s3_bucket):
    n = 1000
    settings = sink_settings(kafka, topics, to=f"s3://{s3_bucket}/", group_id=group_id,
                             video=s3_server.video_settings(), flush_records=300,
                             flush_interval_s=2.0)

    async def go() -> str:
        async with running_sink(settings) as sink:
            await produce(kafka, topics.output, (caption_event(i) for i in range(n)))
            await wait_all_committed(kafka, topics.output, group_id, timeout_s=60)
            with urllib.request.urlopen(f"http://127.0.0.1:{sink.http_port}/metrics") as r:
                return r.read().decode()

    metrics = asyncio.run(go())
    assert 'captionflow_sink_rows_total{dataset="captions"} 1000.0' in metrics
    assert "captionflow_sink_seconds_since_last_commit" in metrics

    keys = [o["Key"] for o in s3_server.client().list_objects_v2(
        Bucket=s3_bucket, Prefix="captions/")["Contents"]]
    names = [FileName.parse(k) for k in keys]
    assert all(name is not None and name.topic == topics.output for name in names), keys
    assert all(k.startswith(f"captions/partition={FileName.parse(k).partition}/") for k in keys)

    table = open_dataset(f"{s3_bucket}/captions",
                         filesystem=s3_filesystem(s3_server.endpoint_url)).to_table()
    assert table.num_rows == n
    rows = sorted(table.to_pylist(), key=lambda r: r["id"])
    assert [r["id"] for r in rows] == [f"ev-{i:05d}" for i in range(n)]
    for i in (0, 1, 517, 999):
        want = orjson.loads(caption_event(i))
        got = rows[i]
        assert got["caption"] == want["caption"]
        assert got["status"] == STATUSES[i % len(STATUSES)]
        assert got["video_info"]["width"] == 1280 and got["usage"]["prompt_tokens"] == 100 + i
        assert got["windows"][1]["status"] == "truncated"
        assert orjson.loads(got["windows"][0]["caption_json"]) == {"objects": ["ball", i]}
        assert dict(got["captions"]) == want["captions"]
        assert orjson.loads(got["caption_json"]) == want["caption_json"]
        assert got["conversation"] == want["conversation"]
    schema = table.schema
    assert pa.types.is_struct(schema.field("video_info").type)
    assert schema.field("video_info").type.field("duration_s").type == pa.float64()
    assert pa.types.is_list(schema.field("windows").type)
    assert pa.types.is_struct(schema.field("windows").type.value_type)
    assert pa.types.is_map(schema.field("captions").type)
    assert pa.types.is_struct(schema.field("usage").type)
    assert pa.types.is_struct(schema.field("timings").type)
    assert schema.field("caption_json").type == pa.string()  # JSON text: any JSON value
    assert schema.field("status").type == pa.string()
    assert pa.types.is_integer(schema.field("partition").type)  # the Hive folder


def test_a_quiet_topic_lands_within_the_flush_interval(tmp_path, kafka, topics, group_id):
    interval_s = 1.5
    settings = sink_settings(kafka, topics, to=str(tmp_path), group_id=group_id,
                             flush_interval_s=interval_s, dead_letter=True)
    dead = encode(DeadLetterEvent(id="bad-1", error=ErrorInfo(
        code="video_not_found", message="no such file", retriable=False), payload="{}",
        created_at="2026-12-03T10:00:00.000Z"))

    async def go() -> float:
        async with running_sink(settings):
            started = time.monotonic()
            await produce(kafka, topics.output, [caption_event(7)])
            await produce(kafka, topics.dead_letter, [dead])
            await wait_until(lambda: list(tmp_path.glob("captions/*/*.parquet")) and
                             list(tmp_path.glob("dead_letter/*/*.parquet")),
                             timeout_s=20, interval_s=0.05)
            return time.monotonic() - started

    took_s = asyncio.run(go())
    # The interval, a poll, the write and slack for a loaded machine: nothing but the
    # interval rolls one record (sink.flush_records is 10,000).
    assert took_s < interval_s + 5.0, f"a single event took {took_s:.1f} s to land"
    [rows] = [open_dataset(str(tmp_path / "captions")).to_table().to_pylist()]
    assert [r["id"] for r in rows] == ["ev-00007"]
    [dl] = open_dataset(str(tmp_path / "dead_letter")).to_table().to_pylist()
    assert dl["id"] == "bad-1" and dl["error"]["code"] == "video_not_found"
    assert not list(tmp_path.rglob("_tmp/*")), "no temporary file is left behind"


def test_a_field_that_appears_later_adds_a_column(tmp_path, kafka, topics, group_id):
    settings = sink_settings(kafka, topics, to=str(tmp_path), group_id=group_id,
                             flush_records=5, flush_interval_s=1.0,
                             partition_by=("date", "partition"))

    async def go() -> None:
        async with running_sink(settings):
            await produce(kafka, topics.output, (caption_event(i) for i in range(20)))
            await wait_all_committed(kafka, topics.output, group_id, timeout_s=30)
            await produce(kafka, topics.output, (
                caption_event(i, quality={"score": 0.5 + i / 100, "flags": ["sharp"]},
                              reviewed=True) for i in range(20, 40)))
            await wait_all_committed(kafka, topics.output, group_id, timeout_s=30)

    asyncio.run(go())
    files = sorted(tmp_path.glob("captions/date=*/partition=*/*.parquet"))
    schemas = [pq.read_schema(f) for f in files]
    assert any("reviewed" not in s.names for s in schemas)  # the old files stay as they were
    assert any("reviewed" in s.names for s in schemas)
    table = open_dataset(str(tmp_path / "captions")).to_table()
    assert table.num_rows == 40
    rows = {r["id"]: r for r in table.to_pylist()}
    assert rows["ev-00003"]["reviewed"] is None and rows["ev-00023"]["reviewed"] is True
    assert orjson.loads(rows["ev-00023"]["quality"]) == {"score": 0.73, "flags": ["sharp"]}
    assert rows["ev-00004"]["date"] == "2026-12-02" and rows["ev-00004"]["video_info"]["codec"] == "h264"
    assert table.schema.field("reviewed").type == pa.bool_()


def test_jsonl_gz_by_model_keeps_records_as_they_were_and_leaves_out_non_objects(
        tmp_path, kafka, topics, group_id):
    settings = sink_settings(kafka, topics, to=str(tmp_path), group_id=group_id,
                             format="jsonl.gz", flush_interval_s=0.5,
                             partition_by=("model", "partition"))
    events = [caption_event(i) for i in range(12)]

    async def go() -> str:
        async with running_sink(settings) as sink:
            await produce(kafka, topics.output, [*events, b"not json", b"[1, 2]"])
            await wait_all_committed(kafka, topics.output, group_id, timeout_s=30)
            with urllib.request.urlopen(f"http://127.0.0.1:{sink.http_port}/metrics") as r:
                return r.read().decode()

    metrics = asyncio.run(go())
    assert 'captionflow_sink_records_skipped_total{reason="malformed_json"} 2.0' in metrics
    files = sorted(tmp_path.glob("captions/model=Qwen%2FQwen2.5-VL-7B-Instruct/partition=*/"
                                 "*.jsonl.gz"))
    lines = [line for f in files for line in gzip.decompress(f.read_bytes()).splitlines()]
    assert sorted(lines) == sorted(events)  # byte for byte, the model field kept
