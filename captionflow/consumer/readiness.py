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
from captionflow.errors import (
    Dependency,
    DependencyState,
    EngineStalledError,
    ErrorCode,
    FatalError,
    PublishFailedError,
)
from captionflow.health import HealthState
from captionflow.metrics import Metrics
from captionflow.serving.base import CaptionBackend
from captionflow.video.s3 import probe_object_store

INTERVAL_S = 1.0
# What to fix when a dependency refuses this worker's own settings.
SETTINGS_TO_FIX = {
    Dependency.OBJECT_STORE: "check the worker's AWS credentials (AWS_ACCESS_KEY_ID/"
                             "AWS_SECRET_ACCESS_KEY, video.s3_profile or its role) and "
                             "video.s3_endpoint_url",
    Dependency.ENGINE: "check serving.openai_api_key and serving.openai_base_url",
    Dependency.BROKER: "check kafka.sasl_username/kafka.sasl_password and the ACLs of "
                       "topics.input, topics.output and topics.dead_letter",
}


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
        self._was_down: dict[Dependency, bool] = {}
        self._missing_seen = 0
        w = settings.worker
        self.gate = DependencyGate(
            {Dependency.ENGINE: self._probe_engine, Dependency.BROKER: self._probe_broker,
             Dependency.OBJECT_STORE: partial(probe_object_store, settings.video,
                                              timeout_s=w.probe_timeout_s)},
            probe_timeout_s=w.probe_timeout_s, backoff_initial_ms=w.probe_backoff_initial_ms,
            backoff_max_ms=w.probe_backoff_max_ms, on_change=self._changed)

    async def _probe_engine(self) -> DependencyState:
        if self._backend.progress.stalled_for_s() >= self._s.worker.engine_stall_s:
            return DependencyState.DOWN
        return await self._backend.health_state()

    async def _probe_broker(self) -> bool:
        """A real metadata request (``topics()`` asks the cluster each call): aiokafka's
        cached broker list never empties, so it cannot tell a dead cluster from a live one."""
        try:
            existing = await self._consumer.topics()
        except (KafkaError, OSError):
            return False
        self._check_output_topics(set(existing))
        return True

    def _check_output_topics(self, existing: set[str]) -> None:
        """An output topic gone from the cluster's metadata (deleted, after the start-up
        check found it) is fatal ``publish_failed``: nothing could be published, and waiting
        would stall every partition silently. Two probes in a row decide, so a broker that
        has not yet learned the topic cannot stop the worker."""
        t = self._s.topics
        missing = [(name, setting) for name, setting in
                   ((t.output, "topics.output"), (t.dead_letter, "topics.dead_letter"))
                   if name not in existing]
        if not missing:
            self._missing_seen = 0
            return
        self._missing_seen += 1
        if self._missing_seen >= 2:
            names = ", ".join(f"{setting}={name!r}" for name, setting in missing)
            self._fail(PublishFailedError(
                f"the output topic(s) {names} no longer exist on Kafka at "
                f"{self._s.kafka.bootstrap_servers}; create them (captionflow topics) or "
                "point the settings at existing topics"))

    def _changed(self, dependency: Dependency, up: bool, reason: str) -> None:
        self._metrics.dependency_up.labels(str(dependency)).set(1 if up else 0)
        misconfigured = self.gate.state(dependency) is DependencyState.MISCONFIGURED
        self._metrics.dependency_misconfigured.labels(str(dependency)).set(
            1 if misconfigured else 0)
        if not up and not self._was_down.get(dependency):
            self._metrics.dependency_outages.labels(str(dependency)).inc()
        self._was_down[dependency] = not up
        self.update()

    def _down_reason(self, dependency: Dependency, why: str) -> str:
        state = self.gate.state(dependency)
        if state is DependencyState.MISCONFIGURED:
            return f"{dependency} refuses this worker's settings: {why}; " \
                   f"{SETTINGS_TO_FIX[dependency]}"
        return f"{dependency} {state}: {why}"

    def update(self) -> None:
        fatal = self._fatal()
        reason = ("stopping" if self._stopping() else
                  f"fatal: {fatal}" if fatal is not None else
                  self._guard.describe() or
                  "; ".join(self._down_reason(dep, why) for dep, why in self.gate.down().items())
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
