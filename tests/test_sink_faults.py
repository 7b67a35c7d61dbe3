"""The sink's exactly-once claim under faults caused for real: a `captionflow sink` process
SIGKILLed while it buffers and while it uploads, the S3 server killed and restarted on its
port while the sink writes, and the broker hung (SIGSTOP) between a write and its commit.
Asserted on what the broker and the store hold."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from captionflow.broker import EmbeddedBroker, run_sync
from captionflow.config import KafkaSettings, TopicSettings
from captionflow.kafka import ensure_topics
from captionflow.sink.layout import FileName
from captionflow.sink.read import open_dataset
from tests.support.kafka_helpers import committed_offsets, wait_all_committed, wait_until
from tests.support.s3_fixtures import MotoServer, free_port
from tests.support.sink_helpers import caption_event, produce, running_sink, sink_settings

pytestmark = pytest.mark.timeout(240)

PART_BYTES = 32 * 1024
NOISE_BYTES = 2000


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def metric(text: str, name: str) -> float | None:
    m = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    return float(m[1]) if m else None


class StoreWatch:
    """Polls the bucket while the sink runs: every object that appears or changes must be
    a whole Parquet file under a final name (never a temporary or partial one)."""

    def __init__(self, client: Any, bucket: str) -> None:
        self.client, self.bucket = client, bucket
        self.seen: dict[str, str] = {}  # key -> ETag already checked
        self.problems: list[str] = []
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> StoreWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except Exception as e:  # a failed poll is a finding, not a crash of the watch
                self.problems.append(f"poll failed: {e!r}")
            self._stop.wait(0.02)

    def check(self) -> None:
        self.polls += 1
        listing = self.client.list_objects_v2(Bucket=self.bucket)
        for item in listing.get("Contents", []):
            key, etag = item["Key"], item["ETag"]
            if self.seen.get(key) == etag:
                continue
            if FileName.parse(key) is None or "_tmp" in key:
                self.problems.append(f"{key}: not a final file name")
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            try:
                rows = pq.read_table(io.BytesIO(body)).num_rows
            except Exception as e:
                self.problems.append(f"{key}: unreadable ({e!r})")
            else:
                if rows == 0:
                    self.problems.append(f"{key}: no rows")
            self.seen[key] = etag


def dataset_ids(client: Any, bucket: str) -> tuple[Counter[str], dict[str, int]]:
    """Ids over every object now in the bucket, and each object's row count."""
    ids: Counter[str] = Counter()
    sizes = {}
    for item in client.list_objects_v2(Bucket=bucket).get("Contents", []):
        body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        column = pq.read_table(io.BytesIO(body), columns=["id"]).column("id").to_pylist()
        ids.update(column)
        sizes[item["Key"]] = len(column)
    return ids, sizes


class SinkProcess:
    """One real `python -m captionflow sink` process."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, port: int) -> None:
        self.port = port
        with log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "captionflow", "sink", *args],
                                         env=env, stdout=out, stderr=subprocess.STDOUT)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while get(self.url("/readyz"))[0] != 200:
            assert self.proc.poll() is None, f"the sink exited with {self.proc.returncode}"
            assert time.monotonic() < deadline, "the sink did not turn ready"
            time.sleep(0.1)

    def metric(self, name: str) -> float | None:
        return metric(get(self.url("/metrics"))[1], name)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def uncommitted_files(sizes: dict[str, int], committed: dict[int, int]) -> list[str]:
    """Files a killed sink left whose offsets were not committed (the next run rewrites
    them under the same names)."""
    out = []
    for key in sizes:
        name = FileName.parse(key)
        if name is not None and name.offset >= committed.get(name.partition, -1):
            out.append(key)
    return out


def test_sigkilled_three_times_every_caption_lands_exactly_once(
        tmp_path, kafka: KafkaSettings, topics: TopicSettings, group_id, monkeypatch, s3_env):
    # moto's own minimum part size (5 MiB, as S3's) lowered, so that files of a few hundred
    # KiB go up in several parts and a kill can land in the middle of one upload.
    monkeypatch.setenv("S3_UPLOAD_PART_MIN_SIZE", str(PART_BYTES))
    server = MotoServer(tmp_path / "moto.log").start()
    try:
        bucket = server.new_bucket()
        client = server.client()
        port = free_port()
        env = {**os.environ,
               "CAPTIONFLOW_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
               "CAPTIONFLOW_KAFKA__ENABLE_IDEMPOTENCE": "false",
               "CAPTIONFLOW_TOPICS__OUTPUT": topics.output,
               "CAPTIONFLOW_TOPICS__INPUT": topics.input,
               "CAPTIONFLOW_TOPICS__DEAD_LETTER": topics.dead_letter,
               "CAPTIONFLOW_VIDEO__S3_ENDPOINT_URL": server.endpoint_url,
               "CAPTIONFLOW_VIDEO__S3_ADDRESSING_STYLE": "path",
               "CAPTIONFLOW_METRICS__HOST": "127.0.0.1",
               "CAPTIONFLOW_SINK__SESSION_TIMEOUT_MS": "2000",
               "CAPTIONFLOW_SINK__HEARTBEAT_INTERVAL_MS": "300",
               "CAPTIONFLOW_SINK__POLL_TIMEOUT_MS": "100",
               "CAPTIONFLOW_SINK__S3_PART_BYTES": str(PART_BYTES)}
        args = ["--to", f"s3://{bucket}/", "--group", group_id, "--metrics-port", str(port),
                "--partition-by", "date", "--partition-by", "partition",
                "--flush-records", "120"]
        log = tmp_path / "sink.log"
        events = [caption_event(i, noise_bytes=NOISE_BYTES) for i in range(1000)]
        left_uncommitted: list[str] = []

        def start(flush_interval_s: float = 2.0) -> SinkProcess:
            sink = SinkProcess([*args, "--flush-interval-s", str(flush_interval_s)], env, log,
                               port)
            sink.wait_ready()
            return sink

        def after_kill() -> None:
            ids, sizes = dataset_ids(client, bucket)
            dups = [i for i, c in ids.items() if c > 1]
            assert not dups, f"after a kill, ids twice in the dataset: {dups[:5]}"
            committed = asyncio.run(committed_offsets(kafka, topics.output, group_id))
            left_uncommitted.extend(uncommitted_files(sizes, committed))

        def kill_mid_upload(sink: SinkProcess) -> None:
            """SIGKILL while a multipart upload that this run began is in flight, once this
            run has written a file (so a roll may be half written)."""
            stale = {u["UploadId"] for u in
                     client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])}
            existing = {o["Key"]: o["ETag"] for o in
                        client.list_objects_v2(Bucket=bucket).get("Contents", [])}
            deadline = time.monotonic() + 60
            wrote = False
            while True:
                assert time.monotonic() < deadline, "no multipart upload seen in 60 s"
                assert sink.proc.poll() is None
                if not wrote:
                    wrote = any(existing.get(o["Key"]) != o["ETag"] for o in
                                client.list_objects_v2(Bucket=bucket).get("Contents", []))
                uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
                if wrote and any(u["UploadId"] not in stale for u in uploads):
                    break
                time.sleep(0.005)
            sink.kill()

        with StoreWatch(client, bucket) as watch:
            # 1. Mid-file: 30 records buffered (below every roll bound), none written.
            sink = start(flush_interval_s=60)
            asyncio.run(produce(kafka, topics.output, events[:30]))
            deadline = time.monotonic() + 30
            while sink.metric("captionflow_sink_buffered_records") != 30:
                assert time.monotonic() < deadline, "the sink did not buffer the 30 records"
                time.sleep(0.05)
            sink.kill()
            assert not client.list_objects_v2(Bucket=bucket).get("Contents")
            after_kill()

            # 2. Mid-upload, while files of the same roll (other dates) may be written.
            sink = start()
            asyncio.run(produce(kafka, topics.output, events[30:500]))
            kill_mid_upload(sink)
            after_kill()

            # 3. Mid-upload again, in a rerun of what the last kill left.
            sink = start()
            asyncio.run(produce(kafka, topics.output, events[500:]))
            kill_mid_upload(sink)
            after_kill()

            # 4. To the end, then SIGTERM.
            sink = start()
            asyncio.run(wait_all_committed(kafka, topics.output, group_id, timeout_s=90))
            sink.proc.send_signal(signal.SIGTERM)
            assert sink.proc.wait(30) == 0
            watch.check()

        assert not watch.problems, "\n".join(watch.problems[:20])
        assert watch.polls > 50
        # The kills left files written and not committed, which the reruns rewrote.
        assert left_uncommitted, "no kill left a written, uncommitted file: nothing was tested"
        ids, sizes = dataset_ids(client, bucket)
        assert sorted(ids) == [f"ev-{i:05d}" for i in range(1000)]
        assert set(ids.values()) == {1}, "some caption is in the dataset twice"
    finally:
        server.stop()


def test_store_outage_pauses_the_sink_and_loses_nothing(
        tmp_path, kafka: KafkaSettings, topics: TopicSettings, group_id, s3_env):
    """moto keeps everything in memory, so "the store comes back" is modelled as a store
    that kept what it had: the test keeps the objects written before the outage, kills the
    server (connections refused), restarts it on the same port with the bucket, and checks
    the two halves together."""
    server = MotoServer(tmp_path / "moto.log").start()
    try:
        bucket = server.new_bucket()
        settings = sink_settings(kafka, topics, to=f"s3://{bucket}/", group_id=group_id,
                                 video=server.video_settings(s3_max_attempts=1,
                                                             fetch_connect_timeout_s=1.0),
                                 flush_records=10, flush_interval_s=1.0)
        before: dict[str, bytes] = {}

        async def go() -> None:
            async with running_sink(settings) as sink:
                ready = f"http://127.0.0.1:{sink.http_port}/readyz"
                await produce(kafka, topics.output, (caption_event(i) for i in range(40)))
                await wait_all_committed(kafka, topics.output, group_id, timeout_s=30)
                client = server.client()
                for item in client.list_objects_v2(Bucket=bucket)["Contents"]:
                    before[item["Key"]] = client.get_object(
                        Bucket=bucket, Key=item["Key"])["Body"].read()
                committed_before = await committed_offsets(kafka, topics.output, group_id)

                server.stop()
                await produce(kafka, topics.output, (caption_event(i) for i in range(40, 80)))
                await wait_until(lambda: get(ready)[0] == 503, timeout_s=20)
                assert "object_store down" in get(ready)[1]
                # It holds what it cannot write (a partition paused after its failed roll
                # may not have fetched all of its records yet).
                await wait_until(lambda: (metric(get(ready.replace("readyz", "metrics"))[1],
                                                 "captionflow_sink_buffered_records") or 0) > 0,
                                 timeout_s=20)
                await asyncio.sleep(4)  # down for a while: retries fail, nothing commits
                assert await committed_offsets(kafka, topics.output, group_id) == \
                    committed_before
                assert get(ready)[0] == 503

                server.start()
                server.client().create_bucket(Bucket=bucket)
                await wait_all_committed(kafka, topics.output, group_id, timeout_s=60)
                await wait_until(lambda: get(ready)[0] == 200, timeout_s=20)

        asyncio.run(go())
        client = server.client()
        after = {item["Key"]: client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
                 for item in client.list_objects_v2(Bucket=bucket)["Contents"]}
        assert before and after and not set(before) & set(after), \
            "a file committed before the outage was written again"
        ids: Counter[str] = Counter()
        for body in [*before.values(), *after.values()]:
            ids.update(pq.read_table(io.BytesIO(body), columns=["id"]).column("id").to_pylist())
        assert sorted(ids) == [f"ev-{i:05d}" for i in range(80)]
        assert set(ids.values()) == {1}
    finally:
        server.stop()


def test_hung_broker_pauses_the_sink_and_nothing_is_lost_or_twice(tmp_path):
    """The broker SIGSTOPped (hung, state kept) between a roll's write and its commit: the
    commit fails, /readyz answers 503, and once the broker answers again the files are
    committed or rewritten under the same names: every caption once."""
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as broker:
        kafka = broker.kafka_settings()
        topics = TopicSettings(input="hb.in", output="hb.out", dead_letter="hb.dlq")
        run_sync(ensure_topics(kafka, (topics.input, topics.output, topics.dead_letter),
                               partitions=4))
        settings = sink_settings(kafka, topics, to=str(tmp_path / "ds"), group_id="hb-sink",
                                 flush_interval_s=4.0, commit_timeout_ms=1500)
        pid = broker._proc.pid  # type: ignore[union-attr]

        async def go() -> None:
            async with running_sink(settings) as sink:
                base = f"http://127.0.0.1:{sink.http_port}"

                def scrape(name: str) -> float:
                    return metric(get(base + "/metrics")[1], name) or 0.0

                await produce(kafka, topics.output, (caption_event(i) for i in range(40)))
                await wait_until(lambda: scrape("captionflow_sink_buffered_records") == 40,
                                 timeout_s=20, interval_s=0.02)
                os.kill(pid, signal.SIGSTOP)
                try:
                    # The roll writes its files (the store answers); its commit cannot.
                    await wait_until(lambda: scrape(
                        'captionflow_sink_commits_total{result="failed"}') >= 1, timeout_s=20)
                    assert list((tmp_path / "ds").glob("captions/*/*.parquet"))
                    await wait_until(lambda: get(base + "/readyz")[0] == 503, timeout_s=10)
                    assert "broker down" in get(base + "/readyz")[1]
                    await asyncio.sleep(2)
                finally:
                    os.kill(pid, signal.SIGCONT)
                await wait_all_committed(kafka, topics.output, "hb-sink", timeout_s=60)
                await wait_until(lambda: get(base + "/readyz")[0] == 200, timeout_s=30)

        asyncio.run(go())
    ids = Counter(open_dataset(str(tmp_path / "ds" / "captions")).to_table(
        columns=["id"]).column("id").to_pylist())
    assert sorted(ids) == [f"ev-{i:05d}" for i in range(40)] and set(ids.values()) == {1}
