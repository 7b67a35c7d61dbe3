"""`captionflow sink` throughput into local Parquet and into S3, against plain pyarrow.

One run, the same N caption events (each a full CaptionEvent with windows, captions,
caption_json, video info; ~1.5 KB of JSON) on an embedded broker's topic with 4
partitions, and for each destination:

- **reference**: the same records' bytes, parsed (orjson), turned into tables by
  ``pyarrow.Table.from_pylist`` (pyarrow infers the types) and written with
  ``pyarrow.parquet.write_table`` (zstd) in files of ``--flush-records`` rows, to a local
  folder or to S3 through ``pyarrow.fs.S3FileSystem``: no Kafka, no commits, no names;
- **sink**: the sink in this process, from its first record to the commit of the last
  (its group join excluded), with ``--flush-records`` per roll.

It prints rows/s, input MB/s (the records' JSON) and output MB/s (Parquet), and the sink's
share of the reference (1.0 = as fast as the plain write): medians of ``--repeat``
interleaved runs. S3 is a moto server on loopback, started here.

    .venv/bin/python bench/bench_sink.py --events 20000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from captionflow.broker import EmbeddedBroker
from captionflow.config import MetricsSettings, Settings, SinkSettings, TopicSettings
from captionflow.consumer.subscriber import assign_all
from captionflow.kafka import ensure_topics, make_consumer, make_producer
from captionflow.schemas.codec import encode
from captionflow.schemas.events import (
    CaptionEvent,
    SourceCoordinates,
    StageTimings,
    TokenUsage,
    Turn,
    VideoInfo,
    WindowCaption,
)
from captionflow.sink.service import Sink

S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
          "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
WORDS = ("a person walks along the beach at sunset while waves roll in and birds circle "
         "above the water near a wooden pier with fishing boats").split()


def event(i: int) -> bytes:
    rng = random.Random(i)
    text = " ".join(rng.choice(WORDS) for _ in range(60))
    return encode(CaptionEvent(
        id=f"ev-{i:07d}", video=[f"s3://videos/clip-{i}.mp4"],
        conversation=[Turn(from_="human", value="Please describe the video in detail.")],
        caption=text, model="Qwen/Qwen2.5-VL-7B-Instruct", finish_reason="stop",
        usage=TokenUsage(prompt_tokens=1200 + i % 50, completion_tokens=80 + i % 30),
        video_info=VideoInfo(duration_s=10.0 + i % 7, source_fps=30.0, total_frames=300,
                             width=1280, height=720, codec="h264", frames_sampled=8,
                             sample_fps=2.0, frame_width=448, frame_height=252),
        windows=[WindowCaption(index=w, start_s=5.0 * w, end_s=5.0 * w + 5, caption=text[:80],
                               finish_reason="stop", usage=TokenUsage(prompt_tokens=600))
                 for w in range(2)],
        captions={"short": text[:40], "long": text}, caption_json={"scene": "beach", "n": i},
        timings=StageTimings(fetch_decode_ms=120.0, inference_ms=900.0, total_ms=1100.0),
        metadata={"dataset": "bench"}, worker="bench",
        source=SourceCoordinates(topic="captionflow.videos", partition=i % 4, offset=i),
        created_at="2026-12-03T10:00:00.000Z"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe if exe.exists() else "moto_server"), "-H", "127.0.0.1",
                             "-p", str(port)], stdout=(work / "moto.log").open("wb"),
                            stderr=subprocess.STDOUT, env={**os.environ, **S3_ENV})
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def reference(raws: list[bytes], chunk: int, write: Callable[[pa.Table, str], int]) -> tuple[float, int]:
    """Seconds and output bytes of parse + from_pylist + write_table, ``chunk`` rows a file."""
    started = time.perf_counter()
    total = 0
    for n, start in enumerate(range(0, len(raws), chunk)):
        table = pa.Table.from_pylist([orjson.loads(r) for r in raws[start:start + chunk]])
        total += write(table, f"ref-{n:05d}.parquet")
    return time.perf_counter() - started, total


async def run_sink(settings: Settings, events: int) -> tuple[float, int]:
    """Seconds from the sink's first record to the commit of the last, and bytes written.
    Once every record is consumed the sink is stopped, which rolls the rest at once (the
    roll interval would otherwise dominate a short run)."""
    sink = Sink(settings)
    first: list[float] = []
    consumed = [0]
    take = sink._take

    def timed_take(tp, records):  # type: ignore[no-untyped-def]
        if not first and records:
            first.append(time.time())
        consumed[0] += len(records)
        take(tp, records)
        if consumed[0] >= events:
            sink.stop()

    sink._take = timed_take  # type: ignore[method-assign]
    assert await sink.run() == 0
    took = sink.metrics._last_commit_at - first[0]  # leaving the group is not counted
    assert sink.metrics.rows.labels("captions")._value.get() == events
    return took, int(sink.metrics.bytes.labels("captions")._value.get())


async def consume_only(kafka, events: int) -> float:  # type: ignore[no-untyped-def]
    """Seconds to read and parse the N records with the same client and poll size: the
    Kafka side of the sink's time."""
    consumer = make_consumer(kafka, client_suffix="-bench", enable_auto_commit=False,
                             auto_offset_reset="earliest", max_poll_records=5000)
    await consumer.start()
    try:
        await assign_all(consumer, ["bench.captions"], from_beginning=True)
        seen, started = 0, None
        while seen < events:
            for records in (await consumer.getmany(timeout_ms=100, max_records=5000)).values():
                if started is None and records:
                    started = time.perf_counter()
                for r in records:
                    orjson.loads(r.value)
                seen += len(records)
        return time.perf_counter() - started
    finally:
        await consumer.stop()


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="cf-bench-sink-"))
    os.environ.update(S3_ENV)
    moto, endpoint = start_moto(work)
    raws = [event(i) for i in range(args.events)]
    in_bytes = sum(len(r) for r in raws)
    print(f"{args.events} events, {in_bytes / args.events:.0f} B of JSON each, "
          f"{args.flush_records} rows a file")
    try:
        with EmbeddedBroker(log_path=work / "tansu.log") as broker:
            kafka = broker.kafka_settings()
            await ensure_topics(kafka, ["bench.captions"], partitions=4)
            producer = make_producer(kafka, idempotent=False, linger_ms=20)
            await producer.start()
            for i, r in enumerate(raws):
                await producer.send("bench.captions", r, key=f"ev-{i:07d}".encode())
            await producer.flush()
            await producer.stop()

            import boto3

            s3 = boto3.client("s3", endpoint_url=endpoint)
            s3.create_bucket(Bucket="bench")
            s3fs = pafs.S3FileSystem(access_key="bench", secret_key="bench", region="us-east-1",
                                     endpoint_override=endpoint[7:], scheme="http")
            local_ref = work / "ref"
            local_ref.mkdir()

            def write_local(table: pa.Table, name: str) -> int:
                pq.write_table(table, local_ref / name, compression="zstd")
                return (local_ref / name).stat().st_size

            def write_s3(table: pa.Table, name: str) -> int:
                pq.write_table(table, f"bench/ref/{name}", filesystem=s3fs,
                               compression="zstd")
                return s3fs.get_file_info(f"bench/ref/{name}").size

            results = []
            consume_s = statistics.median([await consume_only(kafka, args.events)
                                           for _ in range(args.repeat)])
            results.append(("-", "Kafka read + parse only", args.events / consume_s,
                            in_bytes / consume_s / 1e6, 0.0, consume_s))
            for dest, write in (("local", write_local), ("s3", write_s3)):
                refs, sinks, ratios = [], [], []
                for r in range(args.repeat):  # interleaved, so load changes hit both alike
                    ref_s, ref_bytes = reference(raws, args.flush_records, write)
                    to = str(work / f"sink-{r}") if dest == "local" else f"s3://bench/sink-{r}/"
                    settings = Settings(
                        kafka=kafka, topics=TopicSettings(output="bench.captions"),
                        metrics=MetricsSettings(enabled=False),
                        video={"s3_endpoint_url": endpoint, "s3_addressing_style": "path"},
                        sink=SinkSettings(to=to, group_id=f"bench-{dest}-{r}",
                                          flush_records=args.flush_records,
                                          flush_interval_s=1.0, session_timeout_ms=2000,
                                          heartbeat_interval_ms=300, poll_timeout_ms=100,
                                          max_poll_records=5000))
                    sink_s, sink_bytes = await run_sink(settings, args.events)
                    refs.append((ref_s, ref_bytes))
                    sinks.append((sink_s, sink_bytes))
                    ratios.append(ref_s / sink_s)
                for what, runs in (("reference", refs), ("sink", sinks)):
                    s_ = statistics.median(t for t, _ in runs)
                    out = statistics.median(b for _, b in runs)
                    results.append((dest, what, args.events / s_, in_bytes / s_ / 1e6,
                                    out / s_ / 1e6, s_))
                print(f"{dest}: sink/reference rows/s, each run: "
                      f"{', '.join(f'{x:.2f}' for x in ratios)}; median "
                      f"{statistics.median(ratios):.2f}", flush=True)
        print("\n| destination | writer | rows/s | JSON in MB/s | Parquet out MB/s | s |")
        print("|---|---|---:|---:|---:|---:|")
        for dest, what, rps, mbs_in, mbs_out, s in results:
            print(f"| {dest} | {what} | {rps:,.0f} | {mbs_in:.1f} | {mbs_out:.1f} | {s:.2f} |")
    finally:
        moto.terminate()
        moto.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--flush-records", type=int, default=5_000)
    parser.add_argument("--repeat", type=int, default=3, help="Runs of each; medians shown.")
    asyncio.run(main(parser.parse_args()))
