"""A fleet under churn: N `captionflow serve` processes in one consumer group drain a backlog
while a chaos schedule SIGKILLs, SIGTERMs and adds workers, against one fixed-latency
OpenAI-compatible stand-in (tests/support/openai_standin.py: answers each request after
``--latency-s`` using no CPU, and counts requests per event). The stand-in lives only in the
tests and benchmarks; what is measured is the group, not a model.

In one run, on the embedded broker:
1. **one worker** drains ``--reference-events`` alone: the reference events/s;
2. **the fleet**: ``--workers`` start on ``--events``, and at fixed shares of the backlog
   captioned the schedule acts (default: 15% SIGKILL one, 30% SIGTERM one, 45% two join,
   65% SIGKILL one, 80% one joins).

It reports the fleet's events/s against one worker's, lost events (must be 0), duplicate
captions (bounded by what a SIGKILLed worker held), dead letters, engine requests per event
(1.0 = nothing was redone) and whether every partition was committed to its end.

    .venv/bin/python bench/bench_fleet.py --events 5000 --workers 3
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captionflow.broker import EmbeddedBroker  # noqa: E402
from captionflow.config import KafkaSettings, ServingSettings, TopicSettings  # noqa: E402
from captionflow.consumer.subscriber import assign_all  # noqa: E402
from captionflow.kafka import ensure_topics, make_consumer, make_producer  # noqa: E402
from captionflow.schemas import decode_caption_event  # noqa: E402
from tests.support.fleet import kill_group, spawn_worker, write_config  # noqa: E402
from tests.support.kafka_helpers import wait_all_committed  # noqa: E402
from tests.support.openai_standin import OpenAIStandIn  # noqa: E402
from tests.support.worker_fixtures import make_video, worker_settings  # noqa: E402

# (share of the backlog captioned, action)
SCHEDULE = [(0.15, "kill"), (0.30, "term"), (0.45, "join"), (0.45, "join"), (0.65, "kill"),
            (0.80, "join")]


class Outputs:
    """Counts caption and dead-letter events as they land (one consumer for the run)."""

    def __init__(self, kafka: KafkaSettings, topics: list[str]) -> None:
        self.kafka, self.topics = kafka, topics
        self.captions: collections.Counter[str] = collections.Counter()
        self.dead = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Outputs:
        consumer = make_consumer(self.kafka, client_suffix="-bench-reader",
                                 enable_auto_commit=False, auto_offset_reset="earliest")
        await consumer.start()
        await assign_all(consumer, self.topics, from_beginning=True)

        async def loop() -> None:
            try:
                while True:
                    for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                        for r in records:
                            if tp.topic == self.topics[0]:
                                self.captions[decode_caption_event(r.value).id] += 1
                            else:
                                self.dead += 1
            finally:
                await consumer.stop()

        self._task = asyncio.create_task(loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def unique(self, ids: set[str]) -> int:
        return sum(1 for i in ids if i in self.captions)


async def publish(kafka: KafkaSettings, topic: str, videos: list[Path], n: int,
                  prefix: str) -> set[str]:
    producer = make_producer(kafka, idempotent=False, linger_ms=20)
    await producer.start()
    ids = set()
    try:
        futures = []
        for i in range(n):
            event_id = f"{prefix}-{uuid.uuid4().hex[:12]}"
            ids.add(event_id)
            futures.append(await producer.send(topic, orjson.dumps(
                {"id": event_id, "video": [str(videos[i % len(videos)])]}),
                key=event_id.encode()))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return ids


async def drain(kafka: KafkaSettings, topics: TopicSettings, group: str, config: Path,
                ids: set[str], workers: int, log: Path, schedule: list[tuple[float, str]],
                timeout_s: float) -> dict:
    procs: list[subprocess.Popen[bytes]] = []
    actions: list[str] = []
    async with Outputs(kafka, [topics.output, topics.dead_letter]) as out:
        started = time.monotonic()
        procs += [spawn_worker(config, log) for _ in range(workers)]
        pending = list(schedule)
        try:
            while out.unique(ids) < len(ids):
                if time.monotonic() - started > timeout_s:
                    raise TimeoutError(f"{out.unique(ids)} of {len(ids)} captioned")
                done = out.unique(ids) / len(ids)
                while pending and done >= pending[0][0]:
                    _, action = pending.pop(0)
                    alive = [p for p in procs if p.poll() is None]
                    if action == "kill" and len(alive) > 1:
                        kill_group(alive[0])
                    elif action == "term" and len(alive) > 1:
                        alive[0].send_signal(signal.SIGTERM)
                    elif action == "join":
                        procs.append(spawn_worker(config, log))
                    actions.append(f"{action}@{done:.0%}")
                await asyncio.sleep(0.2)
            elapsed = time.monotonic() - started
            await wait_all_committed(kafka, topics.input, group, timeout_s=120)
            committed = True
            await asyncio.sleep(1.0)  # late duplicates
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            codes = [await asyncio.to_thread(p.wait, 90) for p in procs]
        finally:
            for p in procs:
                kill_group(p)
        lost = len(ids) - out.unique(ids)
        duplicates = sum(n for i, n in out.captions.items() if i in ids) - out.unique(ids)
        return {"events": len(ids), "elapsed_s": elapsed, "rate": len(ids) / elapsed,
                "lost": lost, "duplicates": duplicates, "dead": out.dead,
                "committed": committed, "actions": actions, "codes": codes}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--reference-events", type=int, default=0,
                        help="events for the one-worker reference (default: events / 5)")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--latency-s", type=float, default=0.5)
    parser.add_argument("--concurrency", type=int, default=8,
                        help="serving.openai_max_concurrency per worker")
    parser.add_argument("--timeout-s", type=float, default=3600)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    videos = [make_video(work / f"v{i}.mp4", seed=i) for i in range(12)]
    load_before = os.getloadavg()[0]
    with EmbeddedBroker(log_path=work / "tansu.log") as broker, \
            OpenAIStandIn(latency_s=args.latency_s) as standin:
        kafka = broker.kafka_settings()
        serving = ServingSettings(backend="openai", model="standin",
                                  openai_base_url=standin.base_url,
                                  openai_max_concurrency=args.concurrency, max_tokens=8)
        results = {}
        runs = [("one worker", args.reference_events or max(100, args.events // 5), 1, []),
                (f"{args.workers} workers + chaos", args.events, args.workers, SCHEDULE)]
        for name, n, workers, schedule in runs:
            tag = uuid.uuid4().hex[:6]
            topics = TopicSettings(input=f"fleet-{tag}.in", output=f"fleet-{tag}.out",
                                   dead_letter=f"fleet-{tag}.dlq", partitions=args.partitions)
            await ensure_topics(kafka, (topics.input, topics.output, topics.dead_letter),
                                partitions=args.partitions)
            settings = worker_settings(
                kafka, topics, f"fleet-{tag}", serving, (work,),
                **{"worker.max_batch_size": max(1, args.concurrency // 2)})
            config = write_config(settings, work / f"{tag}.json")
            ids = await publish(kafka, topics.input, videos, n, tag)
            before = standin.total()
            r = await drain(kafka, topics, f"fleet-{tag}", config, ids, workers,
                            work / f"{tag}.log", schedule, args.timeout_s)
            r["requests_per_event"] = (standin.total() - before) / n
            results[name] = r
            print(f"{name}: {r}", flush=True)
    one = results["one worker"]["rate"]
    load_after = os.getloadavg()[0]
    print(f"\nstand-in latency {args.latency_s} s, {args.concurrency} requests per worker "
          f"(ideal {args.concurrency / args.latency_s:.0f} events/s per worker), "
          f"{args.partitions} partitions; load {load_before:.1f} -> {load_after:.1f}")
    print("| run | events | events/s | vs one worker | lost | duplicates | dead letters | "
          "engine requests/event | committed to end | schedule |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['events']} | {r['rate']:.1f} | {r['rate'] / one:.2f} | "
              f"{r['lost']} | {r['duplicates']} | {r['dead']} | "
              f"{r['requests_per_event']:.3f} | {'yes' if r['committed'] else 'no'} | "
              f"{' '.join(r['actions']) or '-'} |")
    if any(r["lost"] or r["dead"] for r in results.values()):
        raise SystemExit("events lost or dead-lettered")


if __name__ == "__main__":
    asyncio.run(main())
