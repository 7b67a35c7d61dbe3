"""Which consumed records are finished, and how far each partition may be committed.

A partition's commit point is the lowest offset still in flight, or one past the highest
consumed offset when nothing is: every record below it has its output acknowledged by the
broker. Offsets the consumer never saw (compaction, transaction markers) are skipped
naturally because only consumed offsets are tracked.

The records between the commit point and the highest consumed offset (finished or not) are
what a crash replays: ``room`` and ``over_bound`` let the poll loop keep that span per
partition below ``worker.max_uncommitted_per_partition``.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterable

from aiokafka import TopicPartition


class PartitionOffsets:
    __slots__ = ("_done_max", "_heap", "_in_flight", "_next", "committed")

    def __init__(self) -> None:
        self._heap: list[int] = []
        self._in_flight: dict[int, float] = {}  # offset -> when it was consumed (monotonic)
        self._next: int | None = None  # one past the highest consumed offset
        self._done_max: int | None = None  # the highest finished offset
        self.committed: int | None = None

    def add(self, offset: int) -> bool:
        """Track a consumed record; False if it was consumed already (in flight, or below
        the highest consumed offset and so finished): the consumer may hand a kept
        partition's records out again after a rebalance."""
        if offset in self._in_flight or (self._next is not None and offset < self._next):
            return False
        self._in_flight[offset] = time.monotonic()
        heapq.heappush(self._heap, offset)
        self._next = offset + 1
        return True

    def done(self, offset: int) -> None:
        self._in_flight.pop(offset, None)
        if self._done_max is None or offset > self._done_max:
            self._done_max = offset
        while self._heap and self._heap[0] not in self._in_flight:
            heapq.heappop(self._heap)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def span(self) -> int:
        """Records from the oldest unfinished one to the highest consumed, both included
        (0 when nothing is unfinished)."""
        if not self._heap or self._next is None:
            return 0
        return self._next - self._heap[0]

    def oldest_age_s(self, now: float) -> float:
        """Seconds since the oldest unfinished record was consumed (0 when none is)."""
        if not self._heap:
            return 0.0
        return now - self._in_flight[self._heap[0]]

    def holes(self) -> list[int]:
        """Unfinished offsets below a finished one: each holds finished records back from
        the commit point (and so from a new owner, who would redo them)."""
        if self._done_max is None:
            return []
        return sorted(o for o in self._in_flight if o < self._done_max)

    @property
    def highest_done(self) -> int | None:
        return self._done_max

    @property
    def next_offset(self) -> int | None:
        """One past the highest consumed offset: where fetching resumes."""
        return self._next

    def commit_point(self) -> int | None:
        """The offset to commit (the next record to read after a restart), or None."""
        if self._heap:
            return self._heap[0]
        return self._next

    def pending_commit(self) -> int | None:
        point = self.commit_point()
        if point is None or (self.committed is not None and point <= self.committed):
            return None
        return point


class OffsetTracker:
    """Per-partition bookkeeping for every assigned partition.

    A *suspended* partition was revoked and may come back with the next assignment: its
    work goes on, but only an explicit commit (the revoke's own, in the old generation)
    may include it, so nothing is committed for it while another member may own it."""

    def __init__(self) -> None:
        self._parts: dict[TopicPartition, PartitionOffsets] = {}
        self._suspended: set[TopicPartition] = set()

    def assign(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self._parts.setdefault(tp, PartitionOffsets())

    def drop(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self._parts.pop(tp, None)
            self._suspended.discard(tp)

    def suspend(self, tps: Iterable[TopicPartition]) -> None:
        self._suspended.update(tp for tp in tps if tp in self._parts)

    def reinstate(self, tps: Iterable[TopicPartition]) -> None:
        self._suspended.difference_update(tps)

    def suspended(self) -> set[TopicPartition]:
        return set(self._suspended)

    def holes(self, tps: Iterable[TopicPartition]) -> list[tuple[TopicPartition, int]]:
        return [(tp, o) for tp in tps if tp in self._parts for o in self._parts[tp].holes()]

    def highest_done(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """The highest finished offset of each of ``tps`` that has one."""
        return {tp: done for tp in tps if tp in self._parts
                if (done := self._parts[tp].highest_done) is not None}

    def next_offset(self, tp: TopicPartition) -> int | None:
        part = self._parts.get(tp)
        return None if part is None else part.next_offset

    def owns(self, tp: TopicPartition) -> bool:
        return tp in self._parts

    def partitions(self) -> list[TopicPartition]:
        return list(self._parts)

    def add(self, tp: TopicPartition, offset: int) -> bool:
        """Track a consumed record; False if this partition already had it."""
        return self._parts[tp].add(offset)

    def done(self, tp: TopicPartition, offset: int) -> bool:
        """Mark a record finished; False if its partition is no longer ours."""
        part = self._parts.get(tp)
        if part is None:
            return False
        part.done(offset)
        return True

    def room(self, tp: TopicPartition, offset: int, bound: int) -> bool:
        """Whether ``offset`` may start without the partition's uncommitted span (oldest
        unfinished record to ``offset``) passing ``bound`` records."""
        part = self._parts.get(tp)
        if part is None or not part._heap:
            return True
        return offset - part._heap[0] < bound

    def over_bound(self, bound: int) -> set[TopicPartition]:
        """Partitions whose uncommitted span leaves no room for their next record."""
        return {tp for tp, p in self._parts.items() if p.span() >= bound}

    def oldest_ages_s(self) -> dict[TopicPartition, float]:
        now = time.monotonic()
        return {tp: p.oldest_age_s(now) for tp, p in self._parts.items()}

    def in_flight(self, tps: Iterable[TopicPartition] | None = None) -> int:
        if tps is None:
            return sum(p.in_flight for p in self._parts.values())
        return sum(self._parts[tp].in_flight for tp in tps if tp in self._parts)

    def pending_commits(self, tps: Iterable[TopicPartition] | None = None,
                        ) -> dict[TopicPartition, int]:
        """Commit points that moved; without ``tps``, of every partition not suspended."""
        chosen = {tp: p for tp, p in self._parts.items() if tp not in self._suspended} \
            if tps is None else {tp: self._parts[tp] for tp in tps if tp in self._parts}
        return {tp: point for tp, p in chosen.items()
                if (point := p.pending_commit()) is not None}

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            part = self._parts.get(tp)
            if part is not None and (part.committed is None or offset > part.committed):
                part.committed = offset

    def committed(self, tp: TopicPartition) -> int | None:
        part = self._parts.get(tp)
        return None if part is None else part.committed
