"""Offset commits, in one place: explicit per-partition offsets of the highest contiguous
finished record (never a bare ``commit()``, which commits what was fetched), on an interval,
after every ``max_batch_size`` finished records, on revoke and at shutdown; plus lag."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from captionflow.config import WorkerSettings
from captionflow.consumer.offsets import OffsetTracker
from captionflow.metrics import Metrics

log = logging.getLogger(__name__)


class Committer:
    def __init__(self, consumer: AIOKafkaConsumer, tracker: OffsetTracker,
                 worker: WorkerSettings, metrics: Metrics) -> None:
        self._consumer = consumer
        self._tracker = tracker
        self._w = worker
        self._metrics = metrics
        self._lock = asyncio.Lock()
        self._wanted = asyncio.Event()
        self._done_since_commit = 0

    def record_done(self) -> None:
        """A record finished and moved a commit point: commit soon after a batch's worth."""
        self._done_since_commit += 1
        if self._done_since_commit >= self._w.max_batch_size:
            self._wanted.set()

    async def commit(self, tps: set[TopicPartition] | None = None, *,
                     raise_errors: bool = False) -> None:
        async with self._lock:
            offsets = self._tracker.pending_commits(tps)
            if not offsets:
                return
            try:
                await asyncio.wait_for(self._consumer.commit(offsets),
                                       self._w.commit_timeout_ms / 1000)
            except (KafkaError, AssertionError, TimeoutError) as e:
                self._metrics.commits.labels("failed").inc()
                log.warning("commit of %s failed: %r", fmt_offsets(offsets), e)
                if raise_errors:
                    raise
                return
            self._tracker.mark_committed(offsets)
            self._done_since_commit = 0
            self._metrics.commits.labels("ok").inc()
            log.debug("committed %s", fmt_offsets(offsets))

    async def run(self) -> None:
        """Commit on the interval (or sooner when asked) and refresh the lag gauges."""
        interval_s = self._w.commit_interval_ms / 1000
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wanted.wait(), interval_s)
            self._wanted.clear()
            await self.commit()
            await self._update_lag()

    async def _update_lag(self) -> None:
        suspended = self._tracker.suspended()
        for tp in self._tracker.partitions():
            if tp in suspended:
                continue
            try:
                highwater = self._consumer.highwater(tp)
            except AssertionError:
                continue  # not assigned this instant: a rebalance is under way
            committed = self._tracker.committed(tp)
            if highwater is None:
                continue
            if committed is None:
                try:
                    committed = await self._consumer.position(tp)
                except (KafkaError, AssertionError):
                    continue
            self._metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(
                max(0, highwater - (committed or 0)))


def fmt_offsets(offsets: dict[TopicPartition, int]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]@{o}" for tp, o in sorted(offsets.items()))
