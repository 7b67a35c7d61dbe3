"""Batch mode into S3 (moto): `run_file` with an ``s3://`` output, its checkpoints and its
resume, and DataFlow's FileStorage with an ``s3://`` cache path, through the sink's S3
store."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from captionflow.batch import FileStorage, RowKeys, read_rows, run_file, write_rows
from captionflow.config import Settings
from captionflow.errors import ConfigError
from tests.test_batch_files import Echo
from tests.support.worker_fixtures import make_video


def test_run_file_writes_its_output_to_s3_and_resumes_from_it(tmp_path, s3_server, s3_bucket):
    videos = [make_video(tmp_path / f"v{i}.mp4", i) for i in range(2)]
    source = tmp_path / "in.json"
    source.write_bytes(orjson.dumps([{"id": f"r{i}", "video": [str(v)]}
                                     for i, v in enumerate(videos)]))
    output = f"s3://{s3_bucket}/runs/out_step1.jsonl"
    settings = Settings(video=s3_server.video_settings())
    first = Echo()
    report = asyncio.run(run_file(source, output, cache_type="jsonl", settings=settings,
                                  backend=first, keys=RowKeys()))
    assert report.captioned == 2 and first.calls == 2
    body = s3_server.client().get_object(Bucket=s3_bucket, Key="runs/out_step1.jsonl")
    rows = [orjson.loads(line) for line in body["Body"].read().splitlines()]
    assert [r["id"] for r in rows] == ["r0", "r1"] and all(r["caption"] for r in rows)

    again = Echo()  # a rerun reads the S3 output back and skips what it holds
    report = asyncio.run(run_file(source, output, cache_type="jsonl", settings=settings,
                                  backend=again, keys=RowKeys()))
    assert again.calls == 0 and report.skipped == 2


def test_file_storage_with_an_s3_cache_path(tmp_path, s3_server, s3_bucket, monkeypatch):
    monkeypatch.setenv("CAPTIONFLOW_VIDEO__S3_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("CAPTIONFLOW_VIDEO__S3_ADDRESSING_STYLE", "path")
    first = tmp_path / "in.json"
    first.write_text('[{"video": ["a.mp4"]}]')
    storage = FileStorage(str(first), cache_path=f"s3://{s3_bucket}/cache",
                          file_name_prefix="video_caption", cache_type="parquet")
    one = storage.step()
    assert one.read() == [{"video": ["a.mp4"]}]
    written = one.write([{"video": ["a.mp4"], "caption": "a cat"}])
    assert written == f"s3://{s3_bucket}/cache/video_caption_step1.parquet"
    two = storage.step()
    assert two.read_path == written and two.read() == [{"video": ["a.mp4"], "caption": "a cat"}]
    with pytest.raises(ConfigError, match="no such object"):
        read_rows(f"s3://{s3_bucket}/cache/missing.json", video=s3_server.video_settings())
    assert write_rows(f"s3://{s3_bucket}/x.json", [{"a": 1}], "json",
                      video=s3_server.video_settings()) == f"s3://{s3_bucket}/x.json"
