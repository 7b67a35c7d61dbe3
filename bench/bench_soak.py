"""Soak: drain a backlog through one worker on the real engine and watch it hold its bounds.

Publishes ``--events`` video events up front (a backlog, so backpressure is exercised the
whole time), starts one worker on the tiny model on the vLLM CPU engine, and samples every
``--sample-s`` seconds: in-flight events (against ``worker.max_in_flight``), the RSS of the
worker process and of the engine's processes. At the end it checks that every event came
out exactly once (captions + dead letters by id), that in-flight never exceeded the bound,
and that RSS stayed flat after warm-up (max - median of the samples after the first 10%).

    .venv/bin/python bench/bench_soak.py --events 20000

Prints the figures that go into docs/worker.md; exits 1 if a bound was broken.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import psutil
from _common import engine_work_dir, sample_videos, tree_rss_bytes

from captionflow.broker import EmbeddedBroker
from captionflow.config import Settings, TopicSettings
from captionflow.consumer.service import Worker
from captionflow.consumer.subscriber import subscribe
from captionflow.metrics import Metrics
from captionflow.producer import Publisher
from captionflow.schemas.codec import parse_json


def rss_mib(process: psutil.Process, *, children: bool) -> float:
    return tree_rss_bytes(process, children=children) / 2**20


async def main(args: argparse.Namespace) -> int:
    work, serving = engine_work_dir("cf-soak-", args.model, max_tokens=args.max_tokens)
    videos = sample_videos(work, args.videos)
    from captionflow.serving.vllm_engine import VllmBackend

    me = psutil.Process()
    backend = VllmBackend(serving)
    await backend.start()
    samples: list[tuple[float, int, float, float]] = []
    try:
        with EmbeddedBroker(topics=("s.in", "s.out", "s.dlq"), partitions=4) as broker:
            settings = Settings(
                kafka=broker.kafka_settings(),
                topics=TopicSettings(input="s.in", output="s.out", dead_letter="s.dlq"),
                serving=serving,
                video={"allowed_roots": (work,), "max_frames": 8, "min_pixels": 28 * 28 * 4,
                       "max_pixels": 224 * 168},
                # The quality gate is off: this measures delivery bounds, and random-weight
                # captions would all be asked for again.
                worker={"group_id": "soak", "session_timeout_ms": 2000,
                        "heartbeat_interval_ms": 200, "max_in_flight": args.max_in_flight,
                        "resume_in_flight": args.max_in_flight // 2,
                        "quality_gate_retries": 0},
                metrics={"enabled": False})
            refs = [str(videos[i % len(videos)]) for i in range(args.events)]
            published = time.perf_counter()
            async with Publisher(settings.kafka, topic="s.in") as pub:
                report = await pub.publish_inputs(refs, id_from="uuid")
            sent = {ev.id for ev, _ in report.sent}
            print(f"published {len(sent)} events in {time.perf_counter() - published:.1f} s")
            worker = Worker(settings, backend=backend, metrics=Metrics.fresh())
            task = asyncio.create_task(worker.run())
            seen: dict[str, int] = {}

            def sink(record) -> None:
                event_id = parse_json(record.value).get("id")
                seen[event_id] = seen.get(event_id, 0) + 1

            started = time.perf_counter()
            drain = asyncio.create_task(subscribe(
                settings.kafka, ["s.out", "s.dlq"], sink=sink, count=args.events,
                timeout_s=args.timeout_s))
            peak_in_flight = 0
            while not drain.done():
                in_flight = worker._tracker.in_flight()
                peak_in_flight = max(peak_in_flight, in_flight)
                samples.append((time.perf_counter() - started, in_flight,
                                rss_mib(me, children=False), rss_mib(me, children=True)))
                done = len(seen)
                if len(samples) % max(1, int(30 / args.sample_s)) == 0:
                    print(f"  t={samples[-1][0]:6.0f} s  done={done:6d}  in_flight={in_flight:3d}"
                          f"  worker_rss={samples[-1][2]:7.1f} MiB  total_rss="
                          f"{samples[-1][3]:7.1f} MiB", flush=True)
                await asyncio.wait({drain}, timeout=args.sample_s)
            elapsed = time.perf_counter() - started
            await drain
            worker.stop()
            code = await task
    finally:
        await backend.close()
    steady = samples[len(samples) // 10:] or samples
    worker_rss = [s[2] for s in steady]
    total_rss = [s[3] for s in steady]
    growth = (max(worker_rss) - statistics.median(worker_rss)) / statistics.median(worker_rss)
    growth_total = (max(total_rss) - statistics.median(total_rss)) / statistics.median(total_rss)
    lost = sent - set(seen)
    duplicates = sum(1 for n in seen.values() if n > 1)
    print(f"events={args.events} load={os.getloadavg()[0]:.1f} elapsed={elapsed:.0f} s "
          f"({args.events / elapsed:.1f} events/s) worker exit={code}")
    print(f"in-flight peak {peak_in_flight} (bound {args.max_in_flight})")
    print(f"worker RSS after warm-up: median {statistics.median(worker_rss):.0f} MiB, "
          f"max {max(worker_rss):.0f} MiB, max-median {growth:.1%}")
    print(f"worker+engine RSS after warm-up: median {statistics.median(total_rss):.0f} MiB, "
          f"max {max(total_rss):.0f} MiB, max-median {growth_total:.1%}")
    print(f"lost {len(lost)}, duplicated {duplicates}")
    ok = (not lost and peak_in_flight <= args.max_in_flight and growth < 0.10 and code == 0)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--max-in-flight", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--sample-s", type=float, default=1.0)
    parser.add_argument("--timeout-s", type=float, default=3600.0)
    parser.add_argument("--model", default=None)
    raise SystemExit(asyncio.run(main(parser.parse_args())))
