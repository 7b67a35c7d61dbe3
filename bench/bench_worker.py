"""Worker overhead: events/s through the whole worker (Kafka in, fetch + decode, micro-batch,
engine, Kafka out, commits) against the bare backend captioning the same pre-decoded clips
concurrently, in the same run, on the same engine. Prints the ratio (1.0 = no overhead).

    .venv/bin/python bench/bench_worker.py --events 64

Uses the embedded broker and the tiny random-weight model on the vLLM CPU engine; on a GPU
machine pass --model to measure a real checkpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import psutil
from _common import engine_work_dir, sample_videos

from captionflow.broker import EmbeddedBroker
from captionflow.config import Settings, TopicSettings
from captionflow.consumer.service import Worker
from captionflow.consumer.subscriber import subscribe
from captionflow.metrics import Metrics
from captionflow.producer import Publisher
from captionflow.serving.base import CaptionRequest
from captionflow.video.source import load_clips


async def main(args: argparse.Namespace) -> None:
    work, serving = engine_work_dir("cf-bench-", args.model, max_tokens=args.max_tokens)
    videos = sample_videos(work, args.videos)
    from captionflow.serving.vllm_engine import VllmBackend

    backend = VllmBackend(serving)
    await backend.start()
    try:
        with EmbeddedBroker(topics=("b.in", "b.out", "b.dlq"), partitions=4) as broker:
            settings = Settings(
                kafka=broker.kafka_settings(),
                topics=TopicSettings(input="b.in", output="b.out", dead_letter="b.dlq"),
                serving=serving,
                video={"allowed_roots": (work,), "max_frames": 8, "min_pixels": 28 * 28 * 4,
                       "max_pixels": 224 * 168},
                worker={"group_id": "bench", "session_timeout_ms": 2000,
                        "heartbeat_interval_ms": 200, "max_batch_size": args.batch,
                        # Off: random weights truncate every caption, and the gate would ask
                        # again for each, which the bare side never does.
                        "quality_gate_retries": 0},
                metrics={"enabled": False})
            clips = [load_clips(str(v), settings.video)[0] for v in videos]
            refs = [str(videos[i % len(videos)]) for i in range(args.events)]

            async def bare() -> float:
                started = time.perf_counter()
                await asyncio.gather(*(
                    backend.caption(CaptionRequest(f"bare-{i}", clips[i % len(clips)],
                                                   serving.default_prompt))
                    for i in range(args.events)))
                return time.perf_counter() - started

            await bare()  # warm-up
            bare_s = await bare()
            worker = Worker(settings, backend=backend, metrics=Metrics.fresh())
            task = asyncio.create_task(worker.run())
            # Time the steady state, not the group join (Tansu holds joins for a second).
            while len(worker._tracker.partitions()) < 4:
                await asyncio.sleep(0.05)
            started, decode_cpu0 = time.perf_counter(), decoder_cpu_s()
            async with Publisher(settings.kafka, topic="b.in") as pub:
                await pub.publish_inputs(refs, id_from="uuid")
            result = await subscribe(settings.kafka, ["b.out", "b.dlq"], sink=lambda r: None,
                                     count=args.events, timeout_s=600)
            worker_s = time.perf_counter() - started
            decode_cpu = decoder_cpu_s() - decode_cpu0
            worker.stop()
            await task
    finally:
        await backend.close()
    assert result.records == args.events, result
    print(f"events={args.events} load={os.getloadavg()[0]:.1f}")
    print(f"bare backend : {args.events / bare_s:7.2f} events/s ({bare_s:.2f} s)")
    print(f"whole worker : {args.events / worker_s:7.2f} events/s ({worker_s:.2f} s, "
          "incl. publish, fetch, decode, Kafka round trips)")
    print(f"ratio worker/bare: {bare_s / worker_s:.2f}")
    print(f"decoder processes: {decode_cpu:.2f} CPU-s during the worker run, "
          f"{decode_cpu / (worker_s * (os.cpu_count() or 1)):.0%} of this machine's "
          f"{os.cpu_count()} cores, taken from the engine")


def decoder_cpu_s() -> float:
    """CPU-seconds of this process's decoder children (captionflow.video.decoder_process)."""
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            if any("decoder_process" in part for part in child.cmdline()):
                total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=64)
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--model", default=None)
    asyncio.run(main(parser.parse_args()))
