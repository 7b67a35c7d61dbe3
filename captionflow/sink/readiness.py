"""The sink's readiness: which dependency is down and why, and a watch that probes the
store and the broker (an idle sink notices an outage too) and refreshes the lag.

A failed write marks the store down and a failed commit the broker; the write or commit
that succeeds next marks it up again. Probes decide only while no roll is failing: a
store that answers a HEAD may still refuse the PUT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer

from captionflow.config import Settings
from captionflow.errors import Dependency
from captionflow.health import HealthState
from captionflow.sink.metrics import SinkMetrics
from captionflow.sink.stores import Store

log = logging.getLogger(__name__)


class SinkReadiness:
    def __init__(self, settings: Settings, *, store: Store, health: HealthState,
                 metrics: SinkMetrics, stopping: Callable[[], bool],
                 started: Callable[[], bool]) -> None:
        self._s = settings
        self._store = store
        self._health = health
        self._metrics = metrics
        self._stopping = stopping
        self._started = started
        self._down: dict[Dependency, str] = {}

    def down(self, dependency: Dependency, reason: str) -> None:
        if dependency not in self._down:
            log.warning("%s is down (%s); pausing", dependency, reason)
        self._down[dependency] = reason
        self._metrics.dependency_up.labels(str(dependency)).set(0)
        self.update()

    def up(self, dependency: Dependency) -> None:
        if self._down.pop(dependency, None) is not None:
            log.warning("%s answers again; resuming", dependency)
        self._metrics.dependency_up.labels(str(dependency)).set(1)
        self.update()

    def update(self) -> None:
        reason = ("stopping" if self._stopping() else
                  "; ".join(f"{d} down: {why}" for d, why in self._down.items()) or
                  ("ready" if self._started() else "starting"))
        ready = reason == "ready"
        self._health.ready, self._health.reason = ready, reason
        self._metrics.ready.set(1 if ready else 0)

    async def run(self, consumer: AIOKafkaConsumer, *, failing: Callable[[], bool],
                  retry_now: Callable[[], None], refresh_lag: Callable[[], None]) -> None:
        """Every second: lag and readiness; every ``sink.probe_interval_s`` (every second
        while something is down): probe the store and the broker."""
        k = self._s.sink
        last_probe = 0.0
        while True:
            now = time.monotonic()
            if now - last_probe >= (1.0 if self._down else k.probe_interval_s):
                last_probe = now
                await self._probe(consumer, failing=failing, retry_now=retry_now)
            refresh_lag()
            self.update()
            await asyncio.sleep(1.0)

    async def _probe(self, consumer: AIOKafkaConsumer, *, failing: Callable[[], bool],
                     retry_now: Callable[[], None]) -> None:
        k = self._s.sink
        store_ok = False
        with contextlib.suppress(Exception):
            store_ok = await asyncio.wait_for(asyncio.to_thread(self._store.probe),
                                              k.probe_timeout_s)
        if not store_ok:
            self.down(Dependency.OBJECT_STORE, f"{self._store.url} does not answer")
        elif failing():
            retry_now()  # it answers again: retry the writes now, not after the backoff
        elif Dependency.OBJECT_STORE in self._down:
            self.up(Dependency.OBJECT_STORE)
        broker_ok = False
        with contextlib.suppress(Exception):
            # A real metadata request (``topics()`` asks the cluster each call): aiokafka's
            # cached broker list never empties.
            await asyncio.wait_for(consumer.topics(), k.probe_timeout_s)
            broker_ok = True
        if not broker_ok:
            self.down(Dependency.BROKER,
                      f"Kafka at {self._s.kafka.bootstrap_servers} does not answer")
        elif Dependency.BROKER in self._down and not failing():
            self.up(Dependency.BROKER)
