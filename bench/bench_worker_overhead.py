"""Worker overhead against a fixed-latency stand-in backend, at several loads.

The stand-in models an engine that runs N requests at a time (vLLM's max_num_seqs) and
answers each after exactly ``--latency-s`` seconds, using no CPU; the ideal is
``N / latency`` events/s. For each load N it runs, in the same process and the same run:

- **ideal**: the stand-in alone, E = ``--waves`` x N requests, always N in it;
- **worker**: the whole worker (Kafka in, fetch + decode in the decoder processes,
  micro-batch, the stand-in, Kafka out, commits) over the same E events, with the worker
  settings scaled from their defaults (32 in flight, resume at 16, batches of 8, so 16 in
  the engine): ``max_batch_size`` N/2 (the micro-batcher's bound of 2x a batch puts N in
  the engine), ``max_in_flight`` 2N, ``resume_in_flight`` N.

and prints worker/ideal events/s (1.0 = no overhead), the worker's CPU-ms per event (this
process and its decoder children) and the mean time per stage. The stand-in lives only
here: it is a yardstick, never a test's backend. The quality gate is off (it measures
throughput; the stand-in's captions would pass it anyway).

    .venv/bin/python bench/bench_worker_overhead.py --loads 8 32 128 --latency-s 4
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from captionflow.broker import EmbeddedBroker
from captionflow.config import Settings, TopicSettings
from captionflow.consumer.service import Worker
from captionflow.consumer.subscriber import subscribe
from captionflow.metrics import Metrics
from captionflow.producer import Publisher
from captionflow.samples import SCENES, make_sample_video
from captionflow.serving.base import CaptionBackend, CaptionRequest, CaptionResult


class StandInBackend(CaptionBackend):
    """Answers after a fixed latency, whatever the load; counts the peak concurrency."""

    name = "stand-in"

    def __init__(self, latency_s: float, slots: int) -> None:
        self.latency_s = latency_s
        self.slots = slots
        self._slots = asyncio.Semaphore(slots)
        self.active = 0
        self.peak_active = 0

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def healthy(self) -> bool:
        return True

    def model_info(self) -> dict[str, Any]:
        return {"model": "stand-in"}

    async def caption(self, request: CaptionRequest) -> CaptionResult:
        async with self._slots:
            self.active += 1
            self.peak_active = max(self.peak_active, self.active)
            try:
                await asyncio.sleep(self.latency_s)
            finally:
                self.active -= 1
        return CaptionResult(request.request_id, f"A square moves across {request.request_id}.",
                             "stop", prompt_tokens=100, completion_tokens=8,
                             inference_ms=self.latency_s * 1000)


def cpu_s(proc: psutil.Process) -> float:
    """CPU-seconds of this process and its live children (the decoder processes)."""
    total = sum(proc.cpu_times()[:2])
    for child in proc.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def steady_rate(done_at: list[float], first_wave: int) -> float:
    """Events/s after the first wave finished: what the pipeline sustains, without the
    fill (the first decodes) that any pipeline pays once."""
    done_at = sorted(done_at)
    return (len(done_at) - first_wave) / (done_at[-1] - done_at[first_wave - 1])


async def ideal(backend: StandInBackend, events: int) -> tuple[float, float]:
    done_at: list[float] = []

    async def one(i: int) -> None:
        await backend.caption(CaptionRequest(f"ideal-{i}", None, "p"))
        done_at.append(time.perf_counter())

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(events)))
    return time.perf_counter() - started, steady_rate(done_at, backend.slots)


async def through_worker(work: Path, videos: list[Path], backend: StandInBackend, events: int,
                         in_flight: int, args: argparse.Namespace) -> tuple[float, float, float, dict[str, float]]:
    with EmbeddedBroker(topics=("b.in", "b.out", "b.dlq"), partitions=4) as broker:
        settings = Settings(
            kafka=broker.kafka_settings(),
            topics=TopicSettings(input="b.in", output="b.out", dead_letter="b.dlq"),
            video={"allowed_roots": (work,), "max_frames": 8, "min_pixels": 28 * 28 * 4,
                   "max_pixels": 224 * 168},
            worker={"group_id": "bench", "session_timeout_ms": 2000,
                    "heartbeat_interval_ms": 200, "max_in_flight": 2 * in_flight,
                    "resume_in_flight": int(2 * in_flight * args.resume_fraction), "max_batch_size": max(1, in_flight // 2),
                    "max_poll_records": max(64, 2 * in_flight), "quality_gate_retries": 0},
            metrics={"enabled": False})
        refs = [str(videos[i % len(videos)]) for i in range(events)]
        # The events wait in the topic before the worker joins, so polling is never starved.
        async with Publisher(settings.kafka, topic="b.in") as pub:
            await pub.publish_inputs(refs, id_from="uuid")
        metrics = Metrics.fresh()
        worker = Worker(settings, backend=backend, metrics=metrics)
        me = psutil.Process()
        task = asyncio.create_task(worker.run())
        outputs: list[float] = []
        sub = asyncio.create_task(subscribe(
            settings.kafka, ["b.out", "b.dlq"], sink=lambda r: outputs.append(time.perf_counter()),
            count=events, timeout_s=600))
        # Time from the join (Tansu holds joins for a second) to the last output.
        while len(worker._tracker.partitions()) < 4:
            await asyncio.sleep(0.01)
        started, cpu0 = time.perf_counter(), cpu_s(me)
        result = await sub
        worker_s = time.perf_counter() - started
        cpu = cpu_s(me) - cpu0
        worker.stop()
        await task
    assert result.records == events, result
    return worker_s, steady_rate(outputs, in_flight), cpu, stage_means_ms(metrics)


def stage_means_ms(metrics: Metrics) -> dict[str, float]:
    """Mean seconds per event of each stage the worker times, in ms."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for family in metrics.stage_seconds.collect():
        for sample in family.samples:
            stage = sample.labels.get("stage", "")
            if sample.name.endswith("_sum"):
                sums[stage] = sample.value
            elif sample.name.endswith("_count"):
                counts[stage] = sample.value
    return {k: sums[k] / counts[k] * 1000 for k in sums if counts.get(k)}


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="cf-bench-overhead-"))
    videos = []
    for i in range(args.videos):
        _, background, square = SCENES[i % len(SCENES)]
        shifted = tuple((c + 37 * i) % 256 for c in background)
        videos.append(make_sample_video(work / f"v{i}.mp4", shifted, square))  # type: ignore[arg-type]
    print(f"resume_in_flight = {args.resume_fraction:g} x max_in_flight")
    print(f"stand-in latency {args.latency_s:g} s, {args.waves} waves per load, "
          f"{args.repeats} alternating runs (median), load avg {os.getloadavg()[0]:.1f}, "
          f"{os.cpu_count()} cores")
    print("steady = events/s after the first wave (no pipeline fill); whole = all events "
          "over the whole run")
    print(f"{'in flight':>9} {'events':>6} {'ideal ev/s':>10} {'worker ev/s':>11} "
          f"{'steady w/i':>10} {'whole w/i':>9} {'CPU-ms/event':>12} {'peak in backend':>15}")
    for n in args.loads:
        events = args.waves * n
        steady, whole, rates, cpus, peaks = [], [], [], [], []
        for _ in range(args.repeats):
            backend = StandInBackend(args.latency_s, n)
            ideal_s, ideal_rate = await ideal(backend, events)
            backend.peak_active = 0
            worker_s, worker_rate, cpu, stages = await through_worker(
                work, videos, backend, events, n, args)
            steady.append(worker_rate / ideal_rate)
            whole.append(ideal_s / worker_s)
            rates.append(worker_rate)
            cpus.append(cpu / events * 1000)
            peaks.append(backend.peak_active)
        print(f"{n:>9} {events:>6} {n / args.latency_s:>10.1f} {statistics.median(rates):>11.1f} "
              f"{statistics.median(steady):>10.3f} {statistics.median(whole):>9.3f} "
              f"{statistics.median(cpus):>12.1f} {max(peaks):>15}", flush=True)
        print("          last run, mean ms per event: " + ", ".join(
            f"{k} {v:.0f}" for k, v in stages.items()), flush=True)
    print(f"load avg after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--latency-s", type=float, default=4.0)
    parser.add_argument("--waves", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--resume-fraction", type=float, default=0.5,
                        help="worker.resume_in_flight as a share of max_in_flight "
                             "(the defaults' is 16/32)")
    asyncio.run(main(parser.parse_args()))
