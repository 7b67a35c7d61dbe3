"""The worker: wires poll -> pipeline -> publish -> commit, with backpressure, dependency
outages, the poison guard, rebalance handling, health endpoints and a two-phase shutdown.
The stages live in their own modules; this class owns the loop and the lifecycle.

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
from captionflow.consumer.commit import Committer
from captionflow.consumer.dependencies import DependencyGate
from captionflow.consumer.frames import timed_clips
from captionflow.consumer.guard import PoisonGuard
from captionflow.health import HealthServer, HealthState
from captionflow.consumer.offsets import OffsetTracker
from captionflow.consumer.pipeline import Output, RecordPipeline, where
from captionflow.consumer.publish import OutputPublisher
from captionflow.consumer.readiness import ReadinessWatch
from captionflow.consumer.rebalance import RebalanceHandler, consumer_options
from captionflow.consumer.sizing import export_engine_load, size_worker
from captionflow.errors import (
    BrokerUnavailableError,
    CaptionflowError,
    FatalError,
    OutputTooLargeError,
)
from captionflow.kafka import check_topics, make_consumer, refusal, start_client
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
        self._fatal: FatalError | None = None
        self._backpressure = False
        # Records the poison guard holds: their offsets stay unfinished, so uncommitted.
        self._held: set[tuple[TopicPartition, int]] = set()
        self._publishing: set[asyncio.Task | None] = set()  # past the handover gate
        self._by_offset: dict[tuple[TopicPartition, int], asyncio.Task[None]] = {}
        self._guard = PoisonGuard(window_records=settings.worker.poison_window_records,
                                  max_ratio=settings.worker.dead_letter_max_ratio)
        self._consumer: AIOKafkaConsumer | None = None
        self._committer: Committer | None = None
        self._gate: DependencyGate | None = None
        self._watch: ReadinessWatch | None = None
        self._publisher: OutputPublisher | None = None
        self._pipeline: RecordPipeline | None = None
        self._rebalance: RebalanceHandler | None = None
        self._http: HealthServer | None = None
        self.frames: FrameSource | None = None  # its decoder pool, once running
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
            # The probes are served whether or not metrics are: the Deployment relies on them.
            self._http = HealthServer(s.metrics.host, s.metrics.port, self.health,
                                      self.metrics.registry if s.metrics.enabled else None)
            self._http.start()
            stack.callback(self._http.close)
            log.info("%s on http://%s:%d", "metrics and health" if s.metrics.enabled else
                     "health (metrics.enabled=false)", s.metrics.host, self._http.port)
            # Before the engine and the broker: a GPU decode device that cannot be opened is
            # found in a second, not after minutes of loading weights; a machine fault
            # before a cluster one.
            frames = self.frames = FrameSource(s.video)
            stack.push_async_callback(frames.close)
            await frames.start()
            # Before the engine: a topic that does not exist is found in a second.
            await check_topics(s.kafka, {"topics.input": s.topics.input,
                                         "topics.output": s.topics.output,
                                         "topics.dead_letter": s.topics.dead_letter})
            if self._backend is None:
                from captionflow.serving.factory import make_backend
                self._backend = make_backend(s.serving, s.video)
            if self._owns_backend:
                await self._backend.start()
                stack.push_async_callback(self._backend.close)
            backend = self._backend
            s = self._size_from_engine(backend)
            model = str(backend.model_info().get("model", s.serving.model))
            self.metrics.info.labels(captionflow.__version__, s.serving.backend, model,
                                     s.worker.group_id).set(1)
            self._publisher = OutputPublisher(s.kafka)
            await self._publisher.start()
            stack.push_async_callback(self._publisher.close)
            batcher = MicroBatcher(
                partial(backend.caption_tracked, timeout_s=s.serving.request_timeout_s),
                max_batch_size=s.worker.max_batch_size,
                max_wait_ms=s.worker.max_wait_ms,
                max_in_engine=s.worker.max_in_engine or s.worker.max_batch_size,
                on_batch=self.metrics.batch_size.observe,
                on_queue_wait=self.metrics.stage_seconds.labels("queue").observe)
            self.metrics.engine_queued_requests.set_function(lambda: batcher.queued)
            await batcher.start()
            stack.push_async_callback(batcher.close)
            consumer = self._consumer = make_consumer(
                s.kafka, client_suffix="-worker", **consumer_options(s.worker))
            self._committer = Committer(consumer, self._tracker, s.worker, self.metrics)
            self._watch = ReadinessWatch(
                s, backend=backend, consumer=consumer, guard=self._guard, health=self.health,
                metrics=self.metrics, fail=self._fail, fatal=lambda: self._fatal,
                stopping=self._stopping.is_set)
            gate = self._gate = self._watch.gate
            stack.push_async_callback(gate.close)
            self._pipeline = RecordPipeline(
                s, clips=timed_clips(frames, self.metrics), caption=batcher.submit,
                model_name=model,
                metrics=self.metrics, worker_id=self.worker_id, on_dependency=gate.report,
                stopping=self._stopping.is_set)
            self._rebalance = RebalanceHandler(
                on_assigned=self._assigned, on_revoked=self._revoked, on_kept=self._kept,
                on_moved=self._lost, on_lost=self._lost, is_lost=self._membership_lost,
                metrics=self.metrics)
            consumer.subscribe([s.topics.input], listener=self._rebalance)
            await start_client(consumer, s.kafka, role="worker consumer")
            stack.push_async_callback(consumer.stop)
            background = [
                asyncio.create_task(self._committer.run(), name="captionflow-commit"),
                asyncio.create_task(self._watch.run(), name="captionflow-ready")]
            for task in background:
                task.add_done_callback(self._background_done)
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

    def _size_from_engine(self, backend: CaptionBackend) -> Settings:
        """Requests in the engine and events in flight sized from the started engine
        (sizing.py), exported beside the engine's own running and waiting counts."""
        sizing = size_worker(self.settings.worker, self.settings.video, backend.capacity())
        w = sizing.worker
        log.info("engine sizing (%s): up to %d requests in the engine, %d events in flight, "
                 "resume below %d", sizing.source, w.max_in_engine, w.max_in_flight,
                 w.resume_in_flight)
        export_engine_load(self.metrics, sizing, backend)
        self.settings = self.settings.model_copy(update={"worker": w})
        return self.settings

    def _background_done(self, task: asyncio.Task[None]) -> None:
        # A dead commit or readiness loop would leave the worker committing nothing, or
        # ready while it is not: stop loudly instead.
        if task.cancelled() or task.exception() is None:
            return
        self._fail(FatalError(f"{task.get_name()} died: {task.exception()!r}"))

    # --- the loop --------------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        w = self.settings.worker
        consumer = self._consumer
        assert consumer is not None
        while not self._stopping.is_set():
            if self._rebalance is not None and self._rebalance.error is not None:
                raise self._rebalance.error
            paused = self._apply_pauses()
            budget = max(1, min(w.max_poll_records, w.max_in_flight - self._tracker.in_flight()))
            try:
                batches = await consumer.getmany(timeout_ms=w.poll_timeout_ms,
                                                 max_records=budget)
            except KafkaError as e:
                refused = refusal(e, "polling")
                if refused is not None:  # waits, not ready, for as long as it is refused
                    assert self._gate is not None
                    waits = {asyncio.ensure_future(self._gate.report(refused)),
                             asyncio.ensure_future(self._stopping.wait())}
                    _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                    for task in pending:
                        task.cancel()
                    continue
                log.warning("poll failed: %r; retrying", e)
                await asyncio.sleep(w.poll_timeout_ms / 1000)
                continue
            self.started.set()
            for tp, records in batches.items():
                if not self._tracker.owns(tp):
                    continue
                for record in records:
                    if not self._tracker.room(tp, record.offset,
                                              w.max_uncommitted_per_partition):
                        # Fetched again from here once the partition has room.
                        consumer.seek(tp, record.offset)
                        break
                    self._spawn(tp, record)
            if self._idle_or_waiting(paused):
                self._progress()

    def _idle_or_waiting(self, paused: bool) -> bool:
        """Liveness counts real progress only: a finished record (see ``_handle``), nothing
        to do, or waiting on a dependency that is down and being probed (restarting this
        worker would not bring it back). Polling while records are stuck is not progress."""
        if self._tracker.in_flight() == 0 and not paused:
            return True
        assert self._gate is not None
        return bool(self._gate.down()) or self._guard.tripped_code is not None

    def _progress(self) -> None:
        self.health.progress()
        self.metrics.last_progress.set(time.time())

    def _spawn(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes]) -> None:
        if not self._tracker.add(tp, record.offset):
            return  # a kept partition's record that is already in flight or done
        self.metrics.events_consumed.labels(record.topic).inc()
        self.metrics.in_flight.set(self._tracker.in_flight())
        task = asyncio.create_task(self._handle(tp, record, time.monotonic()),
                                   name=f"captionflow-{where(record)}")
        self._tasks.setdefault(tp, set()).add(task)
        self._by_offset[(tp, record.offset)] = task
        task.add_done_callback(partial(self._task_done, tp, record.offset))

    async def _handle(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes],
                      consumed_at: float) -> None:
        assert self._pipeline is not None and self._committer is not None
        output = await self._pipeline.process(record)
        if self._guard.holds(output.error_code):
            # Its offset stays unfinished, so it is uncommitted until a restart after the fix
            # redelivers it; the task itself ends, so no drain (revoke, stop) waits on it.
            log.warning("%s id=%s: held by the poison guard (%s), not dead-lettered",
                        where(record), output.event_id, output.error_code)
            self._held.add((tp, record.offset))
            return
        assert self._rebalance is not None
        # Only the partition's owner after a rebalance publishes (rebalance.py).
        await self._rebalance.settled(tp)
        started = time.monotonic()
        task = asyncio.current_task()
        self._publishing.add(task)
        try:
            await self._publish(record, output)
        finally:
            self._publishing.discard(task)
        now = time.monotonic()
        self.metrics.stage_seconds.labels("publish").observe(now - started)
        self.metrics.stage_seconds.labels("end_to_end").observe(now - consumed_at)
        if self._tracker.done(tp, record.offset):
            self._committer.record_done()
        self._progress()
        if self._guard.record(output.error_code):
            self.metrics.poison_guard_tripped.set(1)
        log.debug("%s id=%s -> %s", where(record), output.event_id, output.topic)

    async def _publish(self, record: ConsumerRecord[bytes, bytes], output: Output) -> None:
        """Publish until acknowledged. A broker outage waits for the broker (never a dead
        letter); a record too large for the producer becomes a smaller output."""
        assert self._publisher is not None and self._pipeline is not None
        assert self._gate is not None
        while True:
            try:
                await self._publisher.send(output.topic, output.key, output.value)
                return
            except BrokerUnavailableError as e:
                log.warning("%s id=%s: publish waits for the broker: %s", where(record),
                            output.event_id, e)
                if await self._gate.report(e):
                    await asyncio.sleep(self.settings.worker.retry_backoff_ms / 1000)
            except OutputTooLargeError as e:
                if output.topic == self.settings.topics.dead_letter:
                    raise FatalError(f"{where(record)}: a bounded dead-letter event was refused "
                                     f"as too large ({e}); check kafka.max_request_size_bytes "
                                     "against worker.dead_letter_payload_max_bytes") from e
                output = self._pipeline.dead_letter_output(record, e, output.event_id, 1)

    def _task_done(self, tp: TopicPartition, offset: int, task: asyncio.Task[None]) -> None:
        self._tasks.get(tp, set()).discard(task)
        self._by_offset.pop((tp, offset), None)
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

    def _apply_pauses(self) -> bool:
        """Pause every partition while in-flight work is above the high watermark (until it
        falls to the low one), while a dependency is down, or once the poison guard has
        tripped; returns whether partitions are paused. Otherwise pause just the partitions
        whose oldest unfinished record is ``worker.max_uncommitted_per_partition`` records
        behind, until it finishes."""
        consumer = self._consumer
        assert consumer is not None and self._gate is not None
        w = self.settings.worker
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
        self.metrics.paused_partitions.set(len(consumer.paused()))
        for tp, age_s in self._tracker.oldest_ages_s().items():
            self.metrics.oldest_unfinished_age.labels(tp.topic, str(tp.partition)).set(age_s)
        return paused

    # --- rebalance -------------------------------------------------------------------------

    def _assigned(self, tps: set[TopicPartition]) -> None:
        self._tracker.assign(tps)
        self.metrics.assigned_partitions.set(len(self._tracker.partitions()))

    async def _revoked(self, tps: set[TopicPartition]) -> None:
        """Commit what finished, in the generation that still owns ``tps``; unfinished work
        goes on and is kept or cancelled once the next assignment is known (rebalance.py)."""
        assert self._committer is not None
        tasks = set().union(*(self._tasks.get(tp, set()) for tp in tps))
        # Wait (bounded) only for records that hold finished ones back from the commit:
        # should the partition move, the new owner would publish those again. A record the
        # poison guard holds has no task left to wait for: it waits for a restart.
        holes = {t for key in self._tracker.holes(tps)
                 if (t := self._by_offset.get(key)) is not None}
        grace_s = self.settings.worker.revoke_grace_s
        if holes and grace_s > 0:
            await asyncio.wait(holes, timeout=grace_s)
        # No record of tps publishes after this commit (a moved partition's new owner
        # would publish it again); one already on its way to the broker is as good as done:
        # let it finish, so the commit below covers it.
        assert self._rebalance is not None
        self._rebalance.hold(tps)
        publishing = tasks & self._publishing
        if publishing:
            await asyncio.wait(publishing, timeout=self.settings.worker.commit_timeout_ms / 1000)
        self._tracker.suspend(tps)
        await self._committer.commit(tps, raise_errors=True)

    def _kept(self, tps: set[TopicPartition]) -> None:
        """A revoked partition came back: commits resume, and fetching resumes after the
        last record consumed (the consumer would restart from the committed offset)."""
        assert self._consumer is not None
        self._tracker.reinstate(tps)
        for tp in tps:
            next_offset = self._tracker.next_offset(tp)
            if next_offset is not None:
                self._consumer.seek(tp, next_offset)

    def _lost(self, tps: set[TopicPartition]) -> None:
        for tp in tps:
            for task in self._tasks.get(tp, set()):
                task.cancel()
        self._forget(tps)

    def _forget(self, tps: set[TopicPartition]) -> None:
        self._tracker.drop(tps)
        self._held = {(tp, offset) for tp, offset in self._held if tp not in tps}
        for tp in tps:
            self._tasks.pop(tp, None)
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(tp.topic, str(tp.partition))
            with contextlib.suppress(KeyError):
                self.metrics.oldest_unfinished_age.remove(tp.topic, str(tp.partition))
        self.metrics.assigned_partitions.set(len(self._tracker.partitions()))

    def _membership_lost(self) -> bool:
        # aiokafka (pinned 0.13.0) has no public lost-membership signal: its listener gets
        # only on_partitions_revoked, and a fenced member reaches it with the generation
        # reset to -1. tests/test_pinned_internals.py::test_aiokafka_fenced_member_*
        # fails when an upgrade changes that.
        coordinator = getattr(self._consumer, "_coordinator", None)
        return coordinator is not None and getattr(coordinator, "generation", 0) == -1

    # --- shutdown --------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        self.health.ready = False
        self.metrics.ready.set(0)
        # Work on a partition revoked in a rebalance still under way is not ours to finish.
        handing_over = self._rebalance.pending() if self._rebalance is not None else set()
        for tp in handing_over:
            for task in self._tasks.get(tp, set()):
                task.cancel()
        tasks = [t for ts in self._tasks.values() for t in ts]
        if tasks and self._fatal is None:
            grace_s = self.settings.worker.shutdown_grace_s
            log.info("draining %d in-flight events (up to %.0f s)", len(tasks), grace_s)
            _, pending = await asyncio.wait(tasks, timeout=grace_s)
            tasks = list(pending)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._committer is not None and not self._membership_lost():
            try:
                await self._committer.commit(raise_errors=False)
            except CaptionflowError as e:
                log.warning("final commit failed: %s", e)

