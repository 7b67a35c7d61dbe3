"""`captionflow publish s3://bucket/prefix/`: one event per video object under the prefix."""

from __future__ import annotations

import os
import subprocess
import sys

import orjson

from captionflow.config import KafkaSettings, TopicSettings
from captionflow.producer.sources import path_id
from captionflow.schemas import decode_video_event
from tests.support.kafka_helpers import read_topic
from tests.support.s3_fixtures import S3_ENV, MotoServer


def _publish(*args: str, kafka: KafkaSettings, topics: TopicSettings,
             server: MotoServer) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **S3_ENV,
           "CAPTIONFLOW_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
           "CAPTIONFLOW_KAFKA__ENABLE_IDEMPOTENCE": "false",
           "CAPTIONFLOW_TOPICS__INPUT": topics.input,
           # The endpoint through the AWS chain, as a deployment would give it.
           "AWS_ENDPOINT_URL": server.endpoint_url}
    return subprocess.run([sys.executable, "-m", "captionflow", "publish", *args],
                          capture_output=True, text=True, env=env, timeout=60)


async def test_cli_publishes_one_event_per_video_object(
        kafka: KafkaSettings, topics: TopicSettings, s3_server: MotoServer,
        s3_bucket: str) -> None:
    client = s3_server.client()
    objects = {  # key: (content type, published?)
        "videos/a.mp4": ("binary/octet-stream", True),
        "videos/sub/b.WEBM": ("binary/octet-stream", True),
        "videos/no-suffix": ("video/mp4", True),  # by content type
        "videos/blob.bin": ("application/octet-stream", False),
        "videos/notes.txt": ("text/plain", False),
        "videos/sub/": ("application/x-directory", False),  # a folder marker
        "other/c.mp4": ("video/mp4", False),  # outside the prefix
    }
    for key, (content_type, _) in objects.items():
        client.put_object(Bucket=s3_bucket, Key=key, Body=b"not decoded by the publisher",
                          ContentType=content_type)
    want = sorted(f"s3://{s3_bucket}/{k}" for k, (_, yes) in objects.items() if yes)

    done = _publish(f"s3://{s3_bucket}/videos/", kafka=kafka, topics=topics, server=s3_server)
    assert done.returncode == 0, done.stderr
    assert "sent 3, rejected 0" in done.stderr
    lines = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert sorted(x["video"][0] for x in lines) == want
    # Ids derive from the key: publishing the prefix again gives the same ids.
    assert {x["id"] for x in lines} == {path_id(url) for url in want}
    records = await read_topic(kafka, topics.input, expected=3)
    events = [decode_video_event(r.value) for r in records]
    assert sorted(e.reference for e in events) == want
    assert all(r.key == e.id.encode() for r, e in zip(records, events, strict=True))

    empty = _publish(f"s3://{s3_bucket}/nothing-here/", f"s3://{s3_bucket}-missing/",
                     kafka=kafka, topics=topics, server=s3_server)
    assert empty.returncode == 1
    assert "no video objects under this prefix" in empty.stderr
    assert "video_not_found" in empty.stderr and "sent 0, rejected 2" in empty.stderr
