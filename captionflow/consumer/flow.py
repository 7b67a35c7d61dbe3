"""Flow control: which partitions the worker fetches from. Everything pauses while in-flight
work is above the high watermark (until it falls to the low one), while a dependency is down
or once the poison guard has tripped; otherwise only the partitions whose oldest unfinished
record is ``worker.max_uncommitted_per_partition`` records behind pause, until it finishes.
"""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaConsumer

from captionflow.config import WorkerSettings
from captionflow.consumer.dependencies import DependencyGate
from captionflow.consumer.guard import PoisonGuard
from captionflow.consumer.offsets import OffsetTracker
from captionflow.metrics import Metrics

log = logging.getLogger(__name__)


class PartitionFlow:
    def __init__(self, consumer: AIOKafkaConsumer, tracker: OffsetTracker, *,
                 gate: DependencyGate, guard: PoisonGuard, metrics: Metrics) -> None:
        self._consumer = consumer
        self._tracker = tracker
        self._gate = gate
        self._guard = guard
        self._metrics = metrics
        self._backpressure = False

    def apply(self, w: WorkerSettings) -> bool:
        """Pause and resume partitions as the module says; returns whether all are paused.
        Called before every poll."""
        consumer = self._consumer
        in_flight = self._tracker.in_flight()
        if not self._backpressure and in_flight >= w.max_in_flight:
            self._backpressure = True
            log.info("backpressure: %d events in flight; pausing partitions", in_flight)
        elif self._backpressure and in_flight <= w.resume_in_flight:
            self._backpressure = False
            log.info("backpressure: %d events in flight; resuming partitions", in_flight)
        paused = self._backpressure or bool(self._gate.down()) or \
            self._guard.tripped_code is not None
        full = self._tracker.over_bound(w.max_uncommitted_per_partition)
        if paused:
            # Newly assigned partitions start unpaused; pausing is idempotent.
            consumer.pause(*consumer.assignment())
        else:
            if consumer.paused() - full:
                consumer.resume(*(consumer.paused() - full))
            if full:
                consumer.pause(*(full & consumer.assignment()))
        self._metrics.paused_partitions.set(len(consumer.paused()))
        for tp, age_s in self._tracker.oldest_ages_s().items():
            self._metrics.oldest_unfinished_age.labels(tp.topic, str(tp.partition)).set(age_s)
        return paused
