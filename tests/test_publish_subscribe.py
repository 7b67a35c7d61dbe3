import json
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from captionflow.config import KafkaSettings, TopicSettings
from captionflow.consumer.subscriber import subscribe
from captionflow.producer import Publisher
from captionflow.producer.sources import expand, path_id
from captionflow.schemas import decode_video_event
from tests.support.kafka_helpers import committed_offsets, read_topic


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "vids" / "sub").mkdir(parents=True)
    a = tmp_path / "vids" / "a.mp4"
    b = tmp_path / "vids" / "sub" / "b.webm"
    for p in (a, b):
        p.write_bytes(b"not decoded by the publisher")
    (tmp_path / "vids" / "notes.txt").write_text("skip me")
    rows = tmp_path / "sample_data.json"
    rows.write_text(json.dumps([
        {"video": ["./videos/sample1.mp4"], "conversation": [{"from": "human", "value": ""}]},
        {"id": "keep-me", "video": ["./videos/sample2.mp4"],
         "conversation": [{"from": "human", "value": "Say hi."}], "source": "dataset-7"},
        {"conversation": []},
        "not an object",
    ]))
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text('{"id": "j1", "video": "x.mp4"}\n\n{broken\n{"id": "j2", "video": ["y.mp4"]}\n')
    return {"a": a, "b": b, "dir": tmp_path / "vids", "rows": rows, "jsonl": jsonl}


def test_expand_files_dirs_globs_rows(files: dict[str, Path]) -> None:
    got = list(expand([str(files["dir"]), str(files["dir"] / "*.mp4"), str(files["rows"]),
                       str(files["jsonl"]), "https://example.com/v.mp4", "missing.mp4"]))
    ok = [c.event for c in got if c.event]
    bad = [c.rejected for c in got if c.rejected]
    assert [e.reference for e in ok] == [
        str(files["a"]), str(files["b"]), str(files["a"]), "./videos/sample1.mp4",
        "./videos/sample2.mp4", "x.mp4", "y.mp4", "https://example.com/v.mp4"]
    assert ok[4].id == "keep-me" and ok[4].metadata == {"source": "dataset-7"}
    assert ok[4].prompt("d") == "Say hi."
    assert [r.reason for r in bad] == [
        "not a valid VideoEvent: video: Field required", "row is not a JSON object",
        bad[2].reason, "no such file or directory"]
    assert bad[2].source.endswith("rows.jsonl:3") and "invalid JSON" in bad[2].reason


def test_id_modes(files: dict[str, Path]) -> None:
    [p1] = [c.event for c in expand([str(files["a"])], id_from="path")]
    [p2] = [c.event for c in expand([str(files["a"])], id_from="path")]
    assert p1.id == p2.id == path_id(str(files["a"]))
    [u1] = [c.event for c in expand([str(files["a"])], id_from="uuid")]
    assert u1.id != p1.id
    got = list(expand([str(files["rows"])], id_from="field"))
    assert [c.event.id for c in got if c.event] == ["keep-me"]
    assert "no string 'id'" in got[0].rejected.reason


async def test_publisher_keys_by_id_and_awaits_delivery(kafka: KafkaSettings, topics: TopicSettings,
                                                        files: dict[str, Path]) -> None:
    async with Publisher(kafka, topic=topics.input) as pub:
        report = await pub.publish_inputs([str(files["rows"]), str(files["dir"])])
    assert len(report.sent) == 4 and len(report.rejected) == 2 and not report.ok
    records = await read_topic(kafka, topics.input, expected=4)
    assert len(records) == 4
    for r in records:
        ev = decode_video_event(r.value)
        assert r.key == ev.id.encode()
    sent = {ev.id: (meta.partition, meta.offset) for ev, meta in report.sent}
    assert {decode_video_event(r.value).id: (r.partition, r.offset) for r in records} == sent


def _cli(*args: str, kafka: KafkaSettings, topics: TopicSettings, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "CAPTIONFLOW_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
           "CAPTIONFLOW_KAFKA__ENABLE_IDEMPOTENCE": "false",
           "CAPTIONFLOW_TOPICS__INPUT": topics.input, "CAPTIONFLOW_TOPICS__OUTPUT": topics.output,
           "CAPTIONFLOW_TOPICS__DEAD_LETTER": topics.dead_letter}
    return subprocess.run([sys.executable, "-m", "captionflow", *args], capture_output=True,
                          text=True, env=env, timeout=60, **kw)


def test_cli_publish_summary_and_exit_codes(kafka, topics, files) -> None:
    ok = _cli("publish", str(files["a"]), str(files["b"]), "--id-from", "path",
              kafka=kafka, topics=topics)
    assert ok.returncode == 0, ok.stderr
    lines = [orjson.loads(line) for line in ok.stdout.splitlines()]
    assert [x["id"] for x in lines] == [path_id(str(files["a"])), path_id(str(files["b"]))]
    assert "sent 2, rejected 0" in ok.stderr
    bad = _cli("publish", str(files["a"]), "nope.mp4", kafka=kafka, topics=topics)
    assert bad.returncode == 1
    assert "rejected nope.mp4: no such file or directory" in bad.stderr
    assert "sent 1, rejected 1" in bad.stderr


def test_cli_subscribe_reads_captions_and_dead_letters(kafka, topics, group_id) -> None:
    async def seed() -> None:
        async with Publisher(kafka, topic=topics.output) as out:
            for i in range(3):
                await out._producer.send_and_wait(topics.output, b'{"id": "c%d"}' % i)
            await out._producer.send_and_wait(topics.dead_letter, b'{"id": "d0"}')

    import asyncio
    asyncio.run(seed())
    got = _cli("subscribe", "--count", "3", "--timeout", "20", kafka=kafka, topics=topics)
    assert got.returncode == 0, got.stderr
    assert sorted(orjson.loads(x)["id"] for x in got.stdout.splitlines()) == ["c0", "c1", "c2"]
    both = _cli("subscribe", "--dead-letter", "--count", "4", "--timeout", "20",
                "--group", group_id, kafka=kafka, topics=topics)
    assert sorted(orjson.loads(x)["id"] for x in both.stdout.splitlines()) == \
        ["c0", "c1", "c2", "d0"]
    committed = asyncio.run(committed_offsets(kafka, topics.output, group_id))
    assert sum(v for v in committed.values() if v > 0) == 3
    short = _cli("subscribe", "--only-dead-letter", "--count", "5", "--timeout", "2",
                 kafka=kafka, topics=topics)
    assert short.returncode == 1 and "timed out after 1 of 5" in short.stderr


async def test_subscribe_timeout_returns_what_it_has(kafka, topics) -> None:
    seen = []
    result = await subscribe(kafka, [topics.output], sink=seen.append, count=1, timeout_s=0.5)
    assert result.timed_out and result.records == 0 and seen == []


async def test_unreachable_broker_is_a_typed_error() -> None:
    from captionflow.broker import free_port
    from captionflow.errors import BrokerUnavailableError, ErrorCode

    nowhere = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}",
                            enable_idempotence=False)
    with pytest.raises(BrokerUnavailableError) as info:
        async with Publisher(nowhere, topic="x"):
            pass
    assert info.value.code is ErrorCode.BROKER_UNAVAILABLE
    assert "kafka.bootstrap_servers" in info.value.message
