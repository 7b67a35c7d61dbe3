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
import socket
import time
from contextlib import AsyncExitStack
from functools import partial

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from prometheus_client import REGISTRY

import captionflow
from captionflow.aio import install_stop_signals
from captionflow.config import Settings
from captionflow.consumer.batch import MicroBatcher
from captionflow.consumer.commit import Committer
from captionflow.consumer.deliver import deliver
from captionflow.consumer.dependencies import DependencyGate
from captionflow.consumer.flow import PartitionFlow
from captionflow.consumer.frames import timed_clips
from captionflow.consumer.guard import PoisonGuard
from captionflow.consumer.inflight import InFlightTasks
from captionflow.consumer.offsets import OffsetTracker
from captionflow.consumer.pipeline import RecordPipeline, where
from captionflow.consumer.publish import OutputPublisher
from captionflow.consumer.readiness import ReadinessWatch
from captionflow.consumer.rebalance import RebalanceHandler, RevokeCommitRefused, consumer_options
from captionflow.consumer.sizing import size_from_engine
from captionflow.errors import (
    CaptionflowError,
    FatalError,
)
from captionflow.health import HealthServer, HealthState
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
        self._tasks = InFlightTasks()
        self._stopping = asyncio.Event()
        self._fatal: FatalError | None = None
        self._guard = PoisonGuard(window_records=settings.worker.poison_window_records,
                                  max_ratio=settings.worker.dead_letter_max_ratio)
        self._consumer: AIOKafkaConsumer | None = None
        self._committer: Committer | None = None
        self._gate: DependencyGate | None = None
        self._flow: PartitionFlow | None = None
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
        install_stop_signals(self.stop, self._stopping.is_set)

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
            s = self.settings = size_from_engine(self.settings, backend, self.metrics)
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
            self._flow = PartitionFlow(consumer, self._tracker, gate=gate, guard=self._guard,
                                       metrics=self.metrics)
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
            assert self._flow is not None
            paused = self._flow.apply(w)
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
        self._tasks.add(tp, record.offset, task)
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
            self.metrics.events_held.labels(output.error_code).inc()
            return
        assert self._rebalance is not None
        # Only the partition's owner after a rebalance publishes (rebalance.py).
        await self._rebalance.settled(tp, record.offset)
        started = time.monotonic()
        assert self._publisher is not None and self._gate is not None
        with self._tasks.publishing():
            await deliver(record, output, publisher=self._publisher, gate=self._gate,
                          pipeline=self._pipeline, settings=self.settings)
        now = time.monotonic()
        self.metrics.stage_seconds.labels("publish").observe(now - started)
        self.metrics.stage_seconds.labels("end_to_end").observe(now - consumed_at)
        if self._tracker.done(tp, record.offset):
            self._committer.record_done()
        self._progress()
        if self._guard.record(output.error_code):
            self.metrics.poison_guard_tripped.set(1)
            assert self._watch is not None
            self._watch.update()  # not ready now, not after the next round of probes
        log.debug("%s id=%s -> %s", where(record), output.event_id, output.topic)

    def _task_done(self, tp: TopicPartition, offset: int, task: asyncio.Task[None]) -> None:
        self._tasks.discard(tp, offset, task)
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

    # --- rebalance -------------------------------------------------------------------------

    def _assigned(self, tps: set[TopicPartition]) -> None:
        self._tracker.assign(tps)
        self.metrics.assigned_partitions.set(len(self._tracker.partitions()))

    async def _revoked(self, tps: set[TopicPartition]) -> None:
        """Commit what finished, in the generation that still owns ``tps``; unfinished work
        goes on and is kept or cancelled once the next assignment is known (rebalance.py)."""
        assert self._committer is not None
        # Wait (bounded) only for records that hold finished ones back from the commit:
        # should the partition move, the new owner would publish those again. A record the
        # poison guard holds has no task left to wait for: it waits for a restart.
        holes = self._tasks.at(self._tracker.holes(tps))
        grace_s = self.settings.worker.revoke_grace_s
        assert self._rebalance is not None
        if holes and grace_s > 0:
            # Meanwhile only the holes publish: a record finishing above the highest
            # finished one would land above a hole too, published and not committable.
            self._rebalance.hold(tps, up_to=self._tracker.highest_done(tps))
            await asyncio.wait(holes, timeout=grace_s)
        # No record of tps publishes after this commit (a moved partition's new owner
        # would publish it again); one already on its way to the broker is as good as done:
        # let it finish, so the commit below covers it.
        self._rebalance.hold(tps)
        publishing = self._tasks.publishing_of(tps)
        if publishing:
            await asyncio.wait(publishing, timeout=self.settings.worker.commit_timeout_ms / 1000)
        self._tracker.suspend(tps)
        try:
            await self._committer.commit(tps, raise_errors=True)
        except (KafkaError, AssertionError, TimeoutError) as e:
            # The group went on without this member (it missed the rejoin window): whoever
            # owns the partitions now redoes what is uncommitted.
            raise RevokeCommitRefused(repr(e)) from e

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
        self._tasks.cancel(tps)
        self._forget(tps)

    def _forget(self, tps: set[TopicPartition]) -> None:
        self._tracker.drop(tps)
        self._tasks.forget(tps)
        for tp in tps:
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
        self._tasks.cancel(self._rebalance.pending() if self._rebalance is not None else ())
        tasks = self._tasks.all()
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

