"""Readiness: probing the engine and the broker, turning outages into not-ready and paused,
and the bounds past which an outage that does not end stops the worker.

``/readyz`` is ready when both dependencies answer their probes, the poison guard has not
tripped and the worker is not stopping; otherwise its body says why. The probes run every
second (an idle worker notices an outage too) and whenever a record meets a dependency
error (through the gate)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from captionflow.config import Settings
from captionflow.consumer.dependencies import DependencyGate
from captionflow.consumer.guard import PoisonGuard
from captionflow.consumer.health import HealthState
from captionflow.errors import Dependency, EngineStalledError, ErrorCode, FatalError
from captionflow.metrics import Metrics
from captionflow.serving.base import CaptionBackend
from captionflow.video.s3 import probe_object_store

INTERVAL_S = 1.0


class ReadinessWatch:
    def __init__(self, settings: Settings, *, backend: CaptionBackend,
                 consumer: AIOKafkaConsumer, guard: PoisonGuard, health: HealthState,
                 metrics: Metrics, fail: Callable[[FatalError], None],
                 fatal: Callable[[], FatalError | None], stopping: Callable[[], bool]) -> None:
        self._s = settings
        self._backend = backend
        self._consumer = consumer
        self._guard = guard
        self._health = health
        self._metrics = metrics
        self._fail = fail
        self._fatal = fatal
        self._stopping = stopping
        w = settings.worker
        self.gate = DependencyGate(
            {Dependency.ENGINE: self._probe_engine, Dependency.BROKER: self._probe_broker,
             Dependency.OBJECT_STORE: partial(probe_object_store, settings.video,
                                              timeout_s=w.probe_timeout_s)},
            probe_timeout_s=w.probe_timeout_s, backoff_initial_ms=w.probe_backoff_initial_ms,
            backoff_max_ms=w.probe_backoff_max_ms, on_change=self._changed)

    async def _probe_engine(self) -> bool:
        if self._backend.progress.stalled_for_s() >= self._s.worker.engine_stall_s:
            return False
        return await self._backend.healthy()

    async def _probe_broker(self) -> bool:
        """A real metadata request (``topics()`` asks the cluster each call): aiokafka's
        cached broker list never empties, so it cannot tell a dead cluster from a live one."""
        try:
            await self._consumer.topics()
        except (KafkaError, OSError):
            return False
        return True

    def _changed(self, dependency: str, up: bool, reason: str) -> None:
        self._metrics.dependency_up.labels(str(dependency)).set(1 if up else 0)
        if not up:
            self._metrics.dependency_outages.labels(str(dependency)).inc()
        self.update()

    def update(self) -> None:
        fatal = self._fatal()
        reason = ("stopping" if self._stopping() else
                  f"fatal: {fatal}" if fatal is not None else
                  self._guard.describe() or
                  "; ".join(f"{dep} down: {why}" for dep, why in self.gate.down().items())
                  or "ready")
        ready = reason == "ready"
        self._health.ready = ready
        self._health.reason = reason
        self._metrics.ready.set(1 if ready else 0)

    async def run(self) -> None:
        w = self._s.worker
        gate = self.gate
        while True:
            engine_ok, broker_ok = await asyncio.gather(
                gate.check(Dependency.ENGINE), gate.check(Dependency.BROKER))
            self._metrics.dependency_up.labels("engine").set(1 if engine_ok else 0)
            self._metrics.dependency_up.labels("broker").set(1 if broker_ok else 0)
            progress = self._backend.progress
            stalled_s = progress.stalled_for_s()
            self._metrics.engine_stalled.set(stalled_s)
            if stalled_s >= w.engine_stall_exit_s:
                self._fail(EngineStalledError(
                    f"{progress.in_flight} request(s) in flight and no token from the engine "
                    f"for {stalled_s:.0f} s (worker.engine_stall_exit_s="
                    f"{w.engine_stall_exit_s:g})"))
            broker_down_s = gate.down_for_s(Dependency.BROKER)
            if w.broker_down_exit_s and broker_down_s >= w.broker_down_exit_s:
                self._fail(FatalError(
                    f"Kafka at {self._s.kafka.bootstrap_servers} unreachable for "
                    f"{broker_down_s:.0f} s (worker.broker_down_exit_s="
                    f"{w.broker_down_exit_s:g}); exiting so fresh clients reconnect",
                    code=ErrorCode.BROKER_UNAVAILABLE))
            self.update()
            await asyncio.sleep(INTERVAL_S)
