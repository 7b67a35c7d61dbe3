"""Records of one Kafka partition waiting to become files, and when they must.

A partition's buffer rolls when it holds ``flush_records`` records, or ``flush_bytes``
bytes of record values, or when its oldest record has waited ``flush_interval_s``: a quiet
topic still lands within the interval. Every file of a roll starts at the first offset of
its folder in that roll, and the roll's offsets are committed only after all of its files
are written (:mod:`captionflow.sink.service`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from captionflow.sink.formats import Row


@dataclass(slots=True)
class PartitionBuffer:
    # folder -> rows, in offset order; dicts keep the order folders first appeared in.
    folders: dict[str, list[Row]] = field(default_factory=dict)
    records: int = 0
    bytes: int = 0
    # Offset after the last record taken in (what a commit after the roll names).
    next_offset: int | None = None
    first_at: float | None = None  # monotonic time the oldest buffered record arrived

    def add(self, folder: str, row: Row | None, offset: int, size: int) -> None:
        """Take in the record at ``offset``; ``row`` None for one that is left out (it still
        moves the commit point)."""
        if row is not None:
            self.folders.setdefault(folder, []).append(row)
        self.records += 1
        self.bytes += size
        self.next_offset = offset + 1
        if self.first_at is None:
            self.first_at = time.monotonic()

    def due(self, *, flush_records: int, flush_bytes: int, flush_interval_s: float,
            now: float | None = None) -> str | None:
        """Why this buffer must roll now (records, bytes, interval), or None."""
        if self.records == 0:
            return None
        if self.records >= flush_records:
            return "records"
        if self.bytes >= flush_bytes:
            return "bytes"
        now = time.monotonic() if now is None else now
        if self.first_at is not None and now - self.first_at >= flush_interval_s:
            return "interval"
        return None

    def clear(self) -> None:
        self.folders = {}
        self.records = 0
        self.bytes = 0
        self.first_at = None
