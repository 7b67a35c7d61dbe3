"""The worker's record tasks, by partition and offset: what a rebalance waits for, hands over
or cancels, and what a stop drains. Offsets themselves are the tracker's (offsets.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Iterator

from aiokafka import TopicPartition

Key = tuple[TopicPartition, int]


class InFlightTasks:
    def __init__(self) -> None:
        self._by_partition: dict[TopicPartition, set[asyncio.Task[None]]] = {}
        self._by_offset: dict[Key, asyncio.Task[None]] = {}
        self._publishing: set[asyncio.Task[None]] = set()  # past the handover gate

    def add(self, tp: TopicPartition, offset: int, task: asyncio.Task[None]) -> None:
        self._by_partition.setdefault(tp, set()).add(task)
        self._by_offset[(tp, offset)] = task

    def discard(self, tp: TopicPartition, offset: int, task: asyncio.Task[None]) -> None:
        self._by_partition.get(tp, set()).discard(task)
        self._by_offset.pop((tp, offset), None)

    @contextlib.contextmanager
    def publishing(self) -> Iterator[None]:
        """Marks the current task as on its way to the broker: a revoke lets it finish."""
        task = asyncio.current_task()
        assert task is not None
        self._publishing.add(task)
        try:
            yield
        finally:
            self._publishing.discard(task)

    def of(self, tps: Iterable[TopicPartition]) -> set[asyncio.Task[None]]:
        return set().union(*(self._by_partition.get(tp, set()) for tp in tps))

    def at(self, keys: Iterable[Key]) -> set[asyncio.Task[None]]:
        """The tasks of these (partition, offset) records that still have one."""
        return {t for key in keys if (t := self._by_offset.get(key)) is not None}

    def publishing_of(self, tps: Iterable[TopicPartition]) -> set[asyncio.Task[None]]:
        return self.of(tps) & self._publishing

    def all(self) -> list[asyncio.Task[None]]:
        return [t for ts in self._by_partition.values() for t in ts]

    def cancel(self, tps: Iterable[TopicPartition]) -> None:
        for task in self.of(tps):
            task.cancel()

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self._by_partition.pop(tp, None)
