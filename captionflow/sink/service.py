"""`captionflow sink`: a consumer group of its own that turns the caption topic (and, with
``sink.dead_letter``, the dead-letter topic) into a dataset, exactly once.

The loop: poll, buffer each partition's records (:mod:`~captionflow.sink.buffer`), and when
a buffer is due, roll it: encode its files, write each (a rename locally, a completed PUT
or multipart upload in S3), and only then commit the offset after its last record. A
partition's next roll waits until that commit succeeded, so at most one roll per partition
is ever written and uncommitted; after a crash, the rerun from the committed offset writes
the same names (each folder's first offset) over whatever that roll left.

A failed write or commit pauses the partition, keeps its rows, turns /readyz 503, and is
retried with capped exponential backoff; nothing is dropped or written twice. SIGTERM
rolls everything buffered, commits and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry

from captionflow.aio import install_stop_signals
from captionflow.config import Settings
from captionflow.errors import BrokerUnavailableError, ConfigError, Dependency, DependencyError
from captionflow.health import HealthServer, HealthState
from captionflow.kafka import make_consumer, start_client
from captionflow.sink.buffer import PartitionBuffer
from captionflow.sink.formats import Row
from captionflow.sink.metrics import SinkMetrics
from captionflow.sink.readiness import SinkReadiness
from captionflow.sink.stores import Store, open_store
from captionflow.sink.writer import PendingFile, build_writers

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Partition:
    buffer: PartitionBuffer = field(default_factory=PartitionBuffer)
    # A roll being written: files still to put, then the offset to commit.
    files: list[PendingFile] | None = None
    commit_offset: int | None = None
    records: int = 0
    failures: int = 0
    retry_at: float = 0.0
    paused: bool = False
    # The partition's committed offset as far as this sink knows (where it started
    # reading, then each commit).
    committed: int | None = None
    rolling: asyncio.Task[bool] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class _Listener(ConsumerRebalanceListener):
    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._sink._revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._sink._assigned(set(assigned))


class Sink:
    """``await sink.run()`` returns the exit code: 0 after a graceful stop."""

    def __init__(self, settings: Settings, *, metrics: SinkMetrics | None = None,
                 store: Store | None = None) -> None:
        if not settings.sink.to:
            raise ConfigError("the sink needs a destination: --to DIR or s3://BUCKET/PREFIX/ "
                              "(sink.to, CAPTIONFLOW_SINK__TO)")
        self.settings = settings
        self.metrics = metrics or SinkMetrics(CollectorRegistry())
        self.store: Store = store or open_store(settings.sink.to, settings)
        self.writers = build_writers(settings, self.store)
        self.health = HealthState(settings.sink.liveness_timeout_s)
        self._parts: dict[TopicPartition, _Partition] = {}
        self._stopping = asyncio.Event()
        self._crash: BaseException | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._http: HealthServer | None = None
        self.started = asyncio.Event()
        self.readiness = SinkReadiness(settings, store=self.store, health=self.health,
                                       metrics=self.metrics, stopping=self._stopping.is_set,
                                       started=self.started.is_set)

    # --- control ---------------------------------------------------------------------------

    def stop(self) -> None:
        if not self._stopping.is_set():
            log.info("stop requested; writing and committing what is buffered")
            self._stopping.set()
            self.readiness.update()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop gracefully; a second one exits at once."""
        install_stop_signals(self.stop, self._stopping.is_set)

    @property
    def http_port(self) -> int | None:
        return self._http.port if self._http else None

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self) -> int:
        s = self.settings
        k = s.sink
        async with AsyncExitStack() as stack:
            if s.metrics.enabled:
                self._http = HealthServer(s.metrics.host, k.metrics_port, self.health,
                                          self.metrics.registry)
                self._http.start()
                stack.callback(self._http.close)
                log.info("metrics and health on http://%s:%d", s.metrics.host,
                         self._http.port)
            consumer = self._consumer = make_consumer(
                s.kafka, client_suffix="-sink", group_id=k.group_id, enable_auto_commit=False,
                auto_offset_reset="earliest", session_timeout_ms=k.session_timeout_ms,
                heartbeat_interval_ms=k.heartbeat_interval_ms,
                max_poll_records=k.max_poll_records)
            await start_client(consumer, s.kafka, role="sink consumer")
            stack.push_async_callback(consumer.stop)
            consumer.subscribe(list(self.writers), listener=_Listener(self))
            log.info("sinking %s into %s as %s", ", ".join(self.writers), self.store.url,
                     k.format)
            watch = asyncio.create_task(self.readiness.run(
                consumer, failing=self._failing, retry_now=self._retry_now,
                refresh_lag=self._refresh_lag), name="captionflow-sink-watch")
            try:
                await self._loop(consumer)
                await self._rolls_finished()
                if self._crash is None:
                    await self._drain(time.monotonic() + k.shutdown_grace_s)
            finally:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch
        return 0 if self._crash is None else 1

    async def _loop(self, consumer: AIOKafkaConsumer) -> None:
        k = self.settings.sink
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                poll = asyncio.ensure_future(consumer.getmany(
                    timeout_ms=k.poll_timeout_ms, max_records=k.max_poll_records))
                await asyncio.wait({poll, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not poll.done():
                    poll.cancel()
                    with contextlib.suppress(asyncio.CancelledError, KafkaError):
                        await poll
                    break
                for tp, records in poll.result().items():
                    self._take(tp, records)
                if consumer.assignment():
                    self.started.set()
                self.health.progress()
                self._roll_due()
        finally:
            stop.cancel()

    async def _drain(self, deadline: float) -> None:
        """Roll every buffer and retry failures until all is committed or the deadline."""
        while time.monotonic() < deadline:
            busy = [tp for tp, p in self._parts.items()
                    if p.buffer.records or p.files is not None]
            if not busy:
                log.info("everything consumed is written and committed")
                return
            await asyncio.gather(*(self._roll(tp, force=True) for tp in busy))
            if any(p.files is not None for p in self._parts.values()):
                await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        left = sum(p.records + p.buffer.records for p in self._parts.values())
        log.warning("stopping with %d record(s) not committed (sink.shutdown_grace_s=%g); "
                    "the next run writes them, under the same names", left,
                    self.settings.sink.shutdown_grace_s)

    # --- records ---------------------------------------------------------------------------

    def _take(self, tp: TopicPartition, records: list[ConsumerRecord[bytes, bytes]]) -> None:
        part = self._parts.get(tp)
        if part is None:  # revoked while the fetch was in flight
            return
        writer = self.writers[tp.topic]
        if part.committed is None and records:
            part.committed = records[0].offset
        for record in records:
            raw = record.value or b""
            try:
                data = orjson.loads(raw)
            except orjson.JSONDecodeError:
                data = None
            if not isinstance(data, dict):
                self.metrics.skipped.labels("malformed_json").inc()
                log.error("%s[%d]@%d (key %r) is not a JSON object; left out of the dataset",
                          tp.topic, tp.partition, record.offset, record.key)
                part.buffer.add("", None, record.offset, len(raw))
                continue
            folder = writer.layout.folder(tp.partition, data)
            part.buffer.add(folder, Row(record.offset, raw, data), record.offset, len(raw))
        self._count_buffered()

    def _count_buffered(self) -> None:
        self.metrics.buffered.set(sum(p.buffer.records + p.records
                                      for p in self._parts.values()))

    def _roll_due(self) -> None:
        """Start a roll for every partition that is due and has none running: files are
        encoded and written in threads while the loop goes on polling."""
        k = self.settings.sink
        now = time.monotonic()
        for tp, p in self._parts.items():
            if p.rolling is not None and not p.rolling.done():
                continue
            if (p.files is not None and now >= p.retry_at) or (p.files is None and p.buffer.due(
                    flush_records=k.flush_records, flush_bytes=k.flush_bytes,
                    flush_interval_s=k.flush_interval_s, now=now)):
                p.rolling = asyncio.create_task(self._roll(tp),
                                                name=f"captionflow-sink-roll-{tp.partition}")
                p.rolling.add_done_callback(self._roll_done)

    def _roll_done(self, task: asyncio.Task[bool]) -> None:
        # A roll handles outages itself; anything else is a defect: stop, commit nothing more.
        if not task.cancelled() and task.exception() is not None and self._crash is None:
            self._crash = task.exception()
            log.error("a roll failed unexpectedly; stopping", exc_info=self._crash)
            self._stopping.set()

    async def _rolls_finished(self) -> None:
        running = [p.rolling for p in self._parts.values()
                   if p.rolling is not None and not p.rolling.done()]
        await asyncio.gather(*running, return_exceptions=True)

    async def _roll(self, tp: TopicPartition, *, force: bool = False) -> bool:
        """Write and commit ``tp``'s roll (starting one from its buffer if none is pending).
        True when it is committed; on failure the partition is paused for a retry."""
        part = self._parts.get(tp)
        if part is None:
            return False
        async with part.lock:
            if self._parts.get(tp) is not part:
                return False
            if part.files is None:
                if not part.buffer.records:
                    return True
                writer = self.writers[tp.topic]
                buffer, part.buffer = part.buffer, PartitionBuffer()
                encoded = await asyncio.to_thread(writer.encode, tp.topic, tp.partition,
                                                  list(buffer.folders.items()))
                if encoded.rejected:
                    self.metrics.skipped.labels("schema_mismatch").inc(encoded.rejected)
                part.files, part.commit_offset = encoded.files, buffer.next_offset
                part.records = buffer.records
            elif not force and time.monotonic() < part.retry_at:
                return False
            try:
                await self._write(tp, part)
                await self._commit(tp, part)
            except DependencyError as e:
                self._failed(tp, part, e)
                return False
            part.files, part.commit_offset, part.records, part.failures = None, None, 0, 0
            if part.paused and self._consumer is not None:
                with contextlib.suppress(KafkaError, AssertionError, KeyError):
                    self._consumer.resume(tp)
                part.paused = False
            self._count_buffered()
            return True

    async def _write(self, tp: TopicPartition, part: _Partition) -> None:
        writer = self.writers[tp.topic]
        assert part.files is not None
        while part.files:
            file = part.files[0]
            try:
                seconds = await asyncio.to_thread(writer.put, file)
            except DependencyError:
                self.metrics.write_failures.inc()
                raise
            part.files.pop(0)
            self.readiness.up(Dependency.OBJECT_STORE)
            self.metrics.write_seconds.observe(seconds)
            self.metrics.files.labels(writer.dataset).inc()
            self.metrics.rows.labels(writer.dataset).inc(file.rows)
            self.metrics.bytes.labels(writer.dataset).inc(len(file.body))
            log.info("wrote %s/%s (%d rows, %d bytes) in %.3f s", self.store.url.rstrip("/"),
                     file.key, file.rows, len(file.body), seconds)

    async def _commit(self, tp: TopicPartition, part: _Partition) -> None:
        assert self._consumer is not None and part.commit_offset is not None
        try:
            await asyncio.wait_for(self._consumer.commit({tp: part.commit_offset}),
                                   self.settings.sink.commit_timeout_ms / 1000)
        except (KafkaError, AssertionError, TimeoutError, OSError) as e:
            self.metrics.commits.labels("failed").inc()
            raise BrokerUnavailableError(
                f"committing {tp.topic}[{tp.partition}]@{part.commit_offset} failed: {e!r}"
            ) from e
        self.metrics.committed()
        part.committed = part.commit_offset
        self.readiness.up(Dependency.BROKER)
        log.debug("committed %s[%d]@%d", tp.topic, tp.partition, part.commit_offset)

    def _failed(self, tp: TopicPartition, part: _Partition, error: DependencyError) -> None:
        k = self.settings.sink
        part.failures += 1
        delay_s = min(k.retry_backoff_max_ms,
                      k.retry_backoff_initial_ms * 2 ** (part.failures - 1)) / 1000
        delay_s *= random.uniform(0.5, 1.0)
        part.retry_at = time.monotonic() + delay_s
        self.readiness.down(error.dependency, error.message)
        if not part.paused and self._consumer is not None:
            with contextlib.suppress(KafkaError, AssertionError, KeyError):
                self._consumer.pause(tp)
            part.paused = True
        log.warning("%s[%d]: %s; %d record(s) kept, paused, retrying in %.1f s", tp.topic,
                    tp.partition, error.message, part.records, delay_s)

    # --- rebalance -------------------------------------------------------------------------

    def _assigned(self, assigned: set[TopicPartition]) -> None:
        for tp in assigned:
            self._parts.setdefault(tp, _Partition())
            writer = self.writers[tp.topic]
            removed = self.store.clean_temporary(writer.dataset, f"{tp.topic}+{tp.partition}+")
            if removed:
                log.info("removed %d temporary file(s) of %s[%d] left by an interrupted run",
                         removed, tp.topic, tp.partition)
        log.info("partitions assigned: %s", _names(assigned))

    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        """Write and commit what the revoked partitions hold, within a bound; what does not
        make it is dropped: the next owner reads it again from the committed offset."""
        if not revoked:
            return
        deadline = time.monotonic() + min(10.0, self.settings.sink.shutdown_grace_s)
        for tp in revoked:
            if tp in self._parts and self._crash is None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._roll(tp, force=True),
                                           max(0.1, deadline - time.monotonic()))
        for tp in revoked:
            self._parts.pop(tp, None)
        self._count_buffered()
        log.info("partitions revoked: %s", _names(revoked))

    def _failing(self) -> bool:
        return any(p.files is not None and p.failures for p in self._parts.values())

    def _retry_now(self) -> None:
        for part in self._parts.values():
            part.retry_at = 0.0

    # --- lag -----------------------------------------------------------------------------

    def _refresh_lag(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        for tp, part in list(self._parts.items()):
            with contextlib.suppress(Exception):
                highwater = consumer.highwater(tp)
                if highwater is not None and part.committed is not None:
                    self.metrics.lag.labels(tp.topic, str(tp.partition)).set(
                        max(0, highwater - part.committed))


def _names(tps: set[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(tps)) or "none"
