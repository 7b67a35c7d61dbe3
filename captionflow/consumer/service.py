"""The worker: wires poll -> pipeline -> publish -> commit, with backpressure, rebalance
handling, health endpoints and a two-phase shutdown. The stages live in their own modules;
this class only owns the loop and the lifecycle.

Delivery is at-least-once: a record's offset is committed only after its output (caption
or dead-letter event) was acknowledged, and only as part of a contiguous prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from contextlib import AsyncExitStack
from functools import partial

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from prometheus_client import REGISTRY

import captionflow
from captionflow.config import Settings
from captionflow.consumer.batch import MicroBatcher
from captionflow.consumer.health import HealthServer, HealthState
from captionflow.consumer.offsets import OffsetTracker
from captionflow.consumer.pipeline import RecordPipeline, where
from captionflow.consumer.publish import OutputPublisher
from captionflow.consumer.rebalance import RebalanceHandler
from captionflow.errors import BrokerUnavailableError, CaptionflowError, FatalError
from captionflow.kafka import make_consumer
from captionflow.metrics import Metrics
from captionflow.serving.base import CaptionBackend
from captionflow.video.source import FrameSource

log = logging.getLogger(__name__)


class Worker:
    """One consumer-group member. ``await worker.run()`` returns the process exit code:
    0 after a graceful stop, 1 after a fatal error (nothing unfinished committed)."""

    def __init__(self, settings: Settings, *, backend: CaptionBackend | None = None,
                 metrics: Metrics | None = None, worker_id: str | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics(REGISTRY)
        self.worker_id = worker_id or f"{settings.kafka.client_id}-{socket.gethostname()}-" \
                                      f"{os.getpid()}"
        self.health = HealthState(settings.worker.liveness_timeout_s)
        self._backend = backend
        self._owns_backend = backend is None
        self._tracker = OffsetTracker()
        self._tasks: dict[TopicPartition, set[asyncio.Task[None]]] = {}
        self._stopping = asyncio.Event()
        self._commit_wanted = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self._fatal: FatalError | None = None
        self._paused = False
        self._done_since_commit = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._publisher: OutputPublisher | None = None
        self._pipeline: RecordPipeline | None = None
        self._rebalance: RebalanceHandler | None = None
        self._http: HealthServer | None = None
        self.started = asyncio.Event()  # set once the consumer has joined and polls

    # --- control ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask for a graceful stop: no more polling, drain within the grace period."""
        if not self._stopping.is_set():
            log.info("stop requested; draining for up to %.0f s",
                     self.settings.worker.shutdown_grace_s)
            self._stopping.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop gracefully; a second one exits at once."""
        loop = asyncio.get_running_loop()

        def on_signal(sig: signal.Signals) -> None:
            if self._stopping.is_set():
                log.warning("second %s: exiting now", sig.name)
                os._exit(1)
            log.info("%s received", sig.name)
            self.stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)

    @property
    def http_port(self) -> int | None:
        return self._http.port if self._http else None

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self) -> int:
        s = self.settings
        async with AsyncExitStack() as stack:
            if s.metrics.enabled:
                self._http = HealthServer(s.metrics.host, s.metrics.port, self.health,
                                          self.metrics.registry)
                self._http.start()
                stack.callback(self._http.close)
                log.info("metrics and health on http://%s:%d", s.metrics.host, self._http.port)
            if self._backend is None:
                from captionflow.serving.factory import make_backend
                self._backend = make_backend(s.serving)
            if self._owns_backend:
                await self._backend.start()
                stack.push_async_callback(self._backend.close)
            backend = self._backend
            model = str(backend.model_info().get("model", s.serving.model))
            self.metrics.info.labels(captionflow.__version__, s.serving.backend, model,
                                     s.worker.group_id).set(1)
            frames = FrameSource(s.video)
            stack.push_async_callback(frames.close)
            self._publisher = OutputPublisher(s.kafka)
            await self._publisher.start()
            stack.push_async_callback(self._publisher.close)
            batcher = MicroBatcher(
                backend.caption, max_batch_size=s.worker.max_batch_size,
                max_wait_ms=s.worker.max_wait_ms, max_in_engine=2 * s.worker.max_batch_size,
                on_batch=self.metrics.batch_size.observe,
                on_queue_wait=self.metrics.stage_seconds.labels("queue").observe)
            await batcher.start()
            stack.push_async_callback(batcher.close)
            self._pipeline = RecordPipeline(
                s, clips=self._timed_clips(frames), caption=batcher.submit, model_name=model,
                metrics=self.metrics, worker_id=self.worker_id)
            consumer = self._consumer = make_consumer(
                s.kafka, client_suffix="-worker", group_id=s.worker.group_id,
                enable_auto_commit=False, auto_offset_reset=s.worker.auto_offset_reset,
                session_timeout_ms=s.worker.session_timeout_ms,
                heartbeat_interval_ms=s.worker.heartbeat_interval_ms,
                max_poll_interval_ms=s.worker.max_poll_interval_ms,
                max_poll_records=s.worker.max_poll_records)
            self._rebalance = RebalanceHandler(
                on_assigned=self._assigned, on_revoked=self._revoked, on_lost=self._lost,
                is_lost=self._membership_lost, metrics=self.metrics)
            consumer.subscribe([s.topics.input], listener=self._rebalance)
            try:
                await consumer.start()
            except (KafkaError, OSError) as e:
                raise BrokerUnavailableError(
                    f"consumer cannot reach Kafka at {s.kafka.bootstrap_servers}: {e}") from e
            stack.push_async_callback(consumer.stop)
            background = [asyncio.create_task(self._commit_loop(), name="captionflow-commit"),
                          asyncio.create_task(self._readiness_loop(), name="captionflow-ready")]
            try:
                await self._poll_loop()
            except FatalError as e:
                self._fail(e)
            finally:
                await self._shutdown()
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)
        if self._fatal is not None:
            log.error("worker stopped on a fatal error: %s", self._fatal)
            return 1
        log.info("worker stopped cleanly")
        return 0

    def _timed_clips(self, frames: FrameSource):
        async def clips(reference: str, overrides: dict):
            started = time.monotonic()
            result = await frames.clips(reference, overrides)
            elapsed = time.monotonic() - started
            fetch_s = sum(c.extra.get("fetch_s", 0.0) for c in result[:1])
            self.metrics.stage_seconds.labels("fetch").observe(fetch_s)
            self.metrics.stage_seconds.labels("decode").observe(max(0.0, elapsed - fetch_s))
            return result
        return clips

    # --- the loop --------------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        w = self.settings.worker
        consumer = self._consumer
        assert consumer is not None
        while not self._stopping.is_set():
            if self._rebalance is not None and self._rebalance.error is not None:
                raise self._rebalance.error
            self._apply_backpressure()
            budget = max(1, min(w.max_poll_records, w.max_in_flight - self._tracker.in_flight()))
            try:
                batches = await consumer.getmany(timeout_ms=w.poll_timeout_ms,
                                                 max_records=budget)
            except KafkaError as e:
                log.warning("poll failed: %r; retrying", e)
                await asyncio.sleep(w.poll_timeout_ms / 1000)
                continue
            self.started.set()
            for tp, records in batches.items():
                if not self._tracker.owns(tp):
                    continue
                for record in records:
                    self._spawn(tp, record)
            self.health.progress()
            self.metrics.last_progress.set(time.time())

    def _spawn(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes]) -> None:
        self._tracker.add(tp, record.offset)
        self.metrics.events_consumed.labels(record.topic).inc()
        self.metrics.in_flight.set(self._tracker.in_flight())
        task = asyncio.create_task(self._handle(tp, record, time.monotonic()),
                                   name=f"captionflow-{where(record)}")
        self._tasks.setdefault(tp, set()).add(task)
        task.add_done_callback(partial(self._task_done, tp))

    async def _handle(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes],
                      consumed_at: float) -> None:
        assert self._pipeline is not None and self._publisher is not None
        output = await self._pipeline.process(record)
        started = time.monotonic()
        await self._publisher.send(output.topic, output.key, output.value)
        now = time.monotonic()
        self.metrics.stage_seconds.labels("publish").observe(now - started)
        self.metrics.stage_seconds.labels("end_to_end").observe(now - consumed_at)
        if self._tracker.done(tp, record.offset):
            self._done_since_commit += 1
            if self._done_since_commit >= self.settings.worker.max_batch_size:
                self._commit_wanted.set()
        log.debug("%s id=%s -> %s", where(record), output.event_id, output.topic)

    def _task_done(self, tp: TopicPartition, task: asyncio.Task[None]) -> None:
        self._tasks.get(tp, set()).discard(task)
        self.metrics.in_flight.set(self._tracker.in_flight())
        if task.cancelled():
            return
        error = task.exception()
        if isinstance(error, FatalError):
            self._fail(error)
        elif error is not None:
            # The pipeline turns every non-fatal error into a dead letter; reaching here
            # is a bug. The record stays uncommitted, so stopping loses nothing.
            self._fail(FatalError(f"record task failed unexpectedly: {error!r}"))

    def _fail(self, error: FatalError) -> None:
        if self._fatal is None:
            log.error("fatal: %s", error)
            self._fatal = error
            self.health.ready = False
            self.health.reason = f"fatal: {error}"
            self.metrics.ready.set(0)
        self._stopping.set()

    def _apply_backpressure(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        w = self.settings.worker
        in_flight = self._tracker.in_flight()
        if not self._paused and in_flight >= w.max_in_flight:
            self._paused = True
            log.info("backpressure: %d events in flight; pausing partitions", in_flight)
        elif self._paused and in_flight <= w.resume_in_flight:
            self._paused = False
            consumer.resume(*consumer.paused())
            log.info("backpressure: %d events in flight; resuming partitions", in_flight)
        if self._paused:
            # Newly assigned partitions start unpaused; pausing is idempotent.
            consumer.pause(*consumer.assignment())
        self.metrics.paused_partitions.set(len(consumer.paused()))

    # --- commits ---------------------------------------------------------------------------

    async def _commit(self, tps: set[TopicPartition] | None = None, *,
                      raise_errors: bool = False) -> None:
        consumer = self._consumer
        assert consumer is not None
        async with self._commit_lock:
            offsets = self._tracker.pending_commits(tps)
            if not offsets:
                return
            try:
                await consumer.commit(offsets)
            except (KafkaError, AssertionError) as e:
                self.metrics.commits.labels("failed").inc()
                log.warning("commit of %s failed: %r", _fmt(offsets), e)
                if raise_errors:
                    raise
                return
            self._tracker.mark_committed(offsets)
            self._done_since_commit = 0
            self.metrics.commits.labels("ok").inc()
            log.debug("committed %s", _fmt(offsets))

    async def _commit_loop(self) -> None:
        interval_s = self.settings.worker.commit_interval_ms / 1000
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._commit_wanted.wait(), interval_s)
            self._commit_wanted.clear()
            await self._commit()
            await self._update_lag()

    async def _update_lag(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        for tp in self._tracker.partitions():
            highwater = consumer.highwater(tp)
            committed = self._tracker.committed(tp)
            if highwater is None:
                continue
            if committed is None:
                try:
                    committed = await consumer.position(tp)
                except (KafkaError, AssertionError):
                    continue
            self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(
                max(0, highwater - (committed or 0)))

    # --- rebalance -------------------------------------------------------------------------

    def _assigned(self, tps: set[TopicPartition]) -> None:
        self._tracker.assign(tps)
        self.metrics.assigned_partitions.set(len(self._tracker.partitions()))

    async def _revoked(self, tps: set[TopicPartition]) -> None:
        tasks = set().union(*(self._tasks.get(tp, set()) for tp in tps))
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.settings.worker.revoke_grace_s)
            for task in pending:
                task.cancel()  # uncommitted, so the next owner redelivers them
            if pending:
                log.warning("revoke: %d events unfinished after %.0f s; left to the next owner",
                            len(pending), self.settings.worker.revoke_grace_s)
                await asyncio.gather(*pending, return_exceptions=True)
        await self._commit(tps, raise_errors=True)
        self._forget(tps)

    def _lost(self, tps: set[TopicPartition]) -> None:
        for tp in tps:
            for task in self._tasks.get(tp, set()):
                task.cancel()
        self._forget(tps)

    def _forget(self, tps: set[TopicPartition]) -> None:
        self._tracker.drop(tps)
        for tp in tps:
            self._tasks.pop(tp, None)
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(tp.topic, str(tp.partition))
        self.metrics.assigned_partitions.set(len(self._tracker.partitions()))

    def _membership_lost(self) -> bool:
        coordinator = getattr(self._consumer, "_coordinator", None)
        return coordinator is not None and getattr(coordinator, "generation", 0) == -1

    # --- readiness and shutdown ------------------------------------------------------------

    async def _readiness_loop(self) -> None:
        assert self._backend is not None and self._consumer is not None
        while True:
            try:
                engine_ok = await asyncio.wait_for(self._backend.healthy(), 5)
            except Exception:
                engine_ok = False
            broker_ok = bool(self._consumer._client.cluster.brokers())
            self.metrics.dependency_up.labels("engine").set(1 if engine_ok else 0)
            self.metrics.dependency_up.labels("broker").set(1 if broker_ok else 0)
            ready = engine_ok and broker_ok and self._fatal is None and \
                not self._stopping.is_set()
            self.health.ready = ready
            self.health.reason = "ready" if ready else (
                "stopping" if self._stopping.is_set() else
                "engine not healthy" if not engine_ok else "broker unreachable")
            self.metrics.ready.set(1 if ready else 0)
            await asyncio.sleep(1.0)

    async def _shutdown(self) -> None:
        self.health.ready = False
        self.metrics.ready.set(0)
        tasks = [t for ts in self._tasks.values() for t in ts]
        if tasks and self._fatal is None:
            grace_s = self.settings.worker.shutdown_grace_s
            log.info("draining %d in-flight events (up to %.0f s)", len(tasks), grace_s)
            _, pending = await asyncio.wait(tasks, timeout=grace_s)
            tasks = list(pending)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._consumer is not None and not self._membership_lost():
            try:
                await self._commit(raise_errors=False)
            except CaptionflowError as e:
                log.warning("final commit failed: %s", e)


def _fmt(offsets: dict[TopicPartition, int]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]@{o}" for tp, o in sorted(offsets.items()))
