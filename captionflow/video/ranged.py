"""A seekable file over ranged reads, for PyAV to decode straight from an object store.

PyAV reads a Python file object through FFmpeg's AVIO callbacks: ``read``, ``seek``,
``tell``. :class:`RangeReader` answers them from a small cache of byte ranges fetched with
one function, ``fetch(start, end) -> bytes`` (``end`` exclusive). Read-ahead grows by a
quarter per request while reads are sequential (from ``min_fetch_bytes`` up to
``max_fetch_bytes``) and falls back to the minimum after a seek. Growth is gentle on
purpose: a run of reads ends with one request whose unread tail is wasted, and doubling
would waste up to the whole run, while a quarter wastes at most a quarter of it. A sparse
sample that seeks from GOP to GOP therefore fetches little beyond the packets it decodes,
and a linear pass still reaches large requests after a few dozen.

``hollow`` ranges are answered with zeros and never fetched. :func:`mp4_hollow_ranges`
finds them for the demux-only probe of an MP4/MOV whose index sits in its ``moov`` box:
the demuxer takes every packet's timestamp, size and keyframe flag from that index, never
from the payload, so the probe pass reads the index alone. Fragmented MP4 (``moof``) keeps
its index next to the payload and is read whole.
"""

from __future__ import annotations

import io
import re
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

FetchRange = Callable[[int, int], bytes]


@dataclass(slots=True)
class ByteCounter:
    """Bytes fetched from the store (thread-safe; one per video, shared by its readers)."""

    value: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, n: int) -> None:
        with self._lock:
            self.value += n

    def __getstate__(self) -> dict[str, int]:
        return {"value": self.value}

    def __setstate__(self, state: dict[str, int]) -> None:
        self.value = state["value"]
        self._lock = threading.Lock()


class RemoteVideo(ABC):
    """A video the decoder reads in ranges (``open``) instead of from a local path.

    Picklable, so a decode child process can open it itself; ``counter`` counts the bytes
    fetched in the process that reads."""

    def __init__(self, *, name: str, size_bytes: int) -> None:
        self.name = name
        self.size_bytes = size_bytes
        self.counter = ByteCounter()

    @property
    def source(self) -> RemoteVideo:
        """What the decoder opens (a local video's is its path)."""
        return self

    @property
    def bytes_read(self) -> int:
        return self.counter.value

    @property
    def payload_skipped(self) -> bool:
        """Whether an ``index_only`` reader of this process left payload bytes unfetched."""
        return False

    def release(self) -> None:
        """Nothing to delete: no local copy was made."""

    @abstractmethod
    def open(self, *, index_only: bool = False) -> RangeReader:
        """A new seekable reader. ``index_only``: the caller only demuxes (the probe pass),
        so payload bytes the demuxer does not interpret may be left unfetched."""


class RangeCache:
    """Fetched ranges of one object, least recently used dropped past ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._segments: list[tuple[int, bytes]] = []  # most recently used last
        self._lock = threading.Lock()

    def find(self, pos: int) -> tuple[int, bytes] | None:
        with self._lock:
            for i, (start, data) in enumerate(self._segments):
                if start <= pos < start + len(data):
                    self._segments.append(self._segments.pop(i))
                    return start, data
        return None

    def put(self, start: int, data: bytes) -> None:
        with self._lock:
            self._segments.append((start, data))
            total = sum(len(d) for _, d in self._segments)
            while len(self._segments) > 1 and total > self._max_bytes:
                total -= len(self._segments.pop(0)[1])


class RangeReader(io.RawIOBase):
    """A read-only, seekable file of ``size`` bytes served by ``fetch``."""

    def __init__(self, fetch: FetchRange, size: int, *, name: str, cache: RangeCache,
                 counter: ByteCounter, min_fetch_bytes: int, max_fetch_bytes: int,
                 hollow: Sequence[tuple[int, int]] = ()) -> None:
        super().__init__()
        self.name = name
        self._fetch = fetch
        self._size = size
        self._cache = cache
        self._counter = counter
        self._min = max(1, min_fetch_bytes)
        self._max = max(self._min, max_fetch_bytes)
        self._next_fetch = self._min
        self._last_fetch_end = -1
        self._hollow = sorted(hollow)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        want = min(len(buffer), self._size - self._pos)
        if want <= 0:
            return 0
        view = memoryview(buffer).cast("B")
        done = 0
        while done < want:
            chunk = self._chunk_at(self._pos, want - done)
            view[done:done + len(chunk)] = chunk
            done += len(chunk)
            self._pos += len(chunk)
        return done

    def _chunk_at(self, pos: int, n: int) -> bytes | memoryview:
        for start, end in self._hollow:
            if start <= pos < end:
                return bytes(min(n, end - pos))
        hit = self._cache.find(pos)
        if hit is None:
            hit = self._fill(pos)
        start, data = hit
        offset = pos - start
        return memoryview(data)[offset:offset + n]

    def _fill(self, pos: int) -> tuple[int, bytes]:
        sequential = pos == self._last_fetch_end
        self._next_fetch = min(self._next_fetch * 5 // 4, self._max) if sequential \
            else self._min
        end = min(pos + self._next_fetch, self._size)
        for start, _ in self._hollow:
            if pos < start < end:
                end = start
        data = self._fetch(pos, end)
        if not data:
            raise EOFError(f"{self.name}: the store returned no bytes at offset {pos}")
        self._counter.add(len(data))
        self._last_fetch_end = pos + len(data)
        self._cache.put(pos, data)
        return pos, data


_BOX_HEADER = struct.Struct(">I4s")
_MAX_TOP_LEVEL_BOXES = 64


def mp4_hollow_ranges(read_at: Callable[[int, int], bytes],
                      size: int) -> list[tuple[int, int]]:
    """Byte ranges of the ``mdat`` payloads of an MP4/MOV whose whole index is in ``moov``,
    or ``[]`` when the file is not one (another container, fragmented MP4, odd boxes)."""
    pos = 0
    boxes: list[tuple[bytes, int, int]] = []  # (type, payload start, end)
    while pos < size and len(boxes) < _MAX_TOP_LEVEL_BOXES:
        header = read_at(pos, 16)
        if len(header) < 8:
            return []
        box_size, kind = _BOX_HEADER.unpack_from(header)
        payload = pos + 8
        if box_size == 1:
            if len(header) < 16:
                return []
            box_size = struct.unpack_from(">Q", header, 8)[0]
            payload = pos + 16
        elif box_size == 0:
            box_size = size - pos
        if box_size < payload - pos or pos + box_size > size:
            return []
        boxes.append((kind, payload, pos + box_size))
        pos += box_size
    kinds = [k for k, _, _ in boxes]
    if pos != size or b"moov" not in kinds or b"moof" in kinds or \
            not all(re.fullmatch(rb"[ -~]{4}", k) for k in kinds):
        return []
    return [(start, end) for kind, start, end in boxes if kind == b"mdat" and end > start]
