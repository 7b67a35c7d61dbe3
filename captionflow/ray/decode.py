"""The CPU stage: fetch, probe, decode and sample each row's video with captionflow's own
video code (:class:`captionflow.video.source.FrameSource`: fetch in a daemon thread under
its deadline, probe and decode in a budgeted child process, SSRF-safe), as Ray tasks.

Each Ray worker process keeps one FrameSource (its decoder child and its event loop) for
the tasks it runs, so a task pays no interpreter start. A row's video that fails gets its
error (code and message) beside it, after the row's retriable attempts
(``worker.max_attempts``), and the engine stage writes that error into the row as
``captionflow run`` does. Only a fatal error (a GPU decode device that cannot be opened)
fails the task. A task whose process dies is retried by Ray (``max_retries``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
import pyarrow as pa

from captionflow.batch.job import batch_video_settings
from captionflow.batch.rows import RowKeys, row_event
from captionflow.captioning import Attempts
from captionflow.config import Settings, VideoSettings
from captionflow.errors import CaptionflowError, FatalError, InternalError
from captionflow.ray.frames import (
    CLIPS,
    DECODE_ERROR,
    EMPTY_FRAMES,
    FRAMES,
    STAGE_COLUMNS,
    frames_column,
    pack_clips,
    pack_error,
)
from captionflow.video.source import FrameSource

log = logging.getLogger(__name__)

# The CLI's form of a row: the whole DataFlow row as JSON text, so rows of any shape survive
# Arrow, and its position in the input file.
ROW = "captionflow_row"
INDEX = "captionflow_index"


def decode_stage(settings: Settings | None = None, keys: RowKeys | None = None, *,
                 decoders_per_task: int = 1) -> Callable[[pa.Table], pa.Table]:
    """A function for ``Dataset.map_batches(fn, batch_format="pyarrow")`` (Ray tasks).

    Rows are the batch's columns (``video``, ``conversation``, ``options``... as in a
    DataFlow row, named by ``keys``), or one ``captionflow_row`` column of JSON rows. Each
    row gets ``captionflow_frames`` (its frames, uint8, every window back to back),
    ``captionflow_clips`` (JSON: each clip's shape, frame times and facts) and
    ``captionflow_decode_error`` (JSON, or null); its other columns pass through.

    Local paths are the user's own files, as in ``captionflow run``
    (:func:`captionflow.batch.job.batch_video_settings`). ``decoders_per_task`` decoder
    processes serve each task: give the task as many CPUs (``num_cpus``).
    """
    settings = settings or Settings.load()
    settings = batch_video_settings(settings)
    video = settings.video.model_copy(update={"decode_workers": decoders_per_task})
    return functools.partial(decode_batch, settings=settings.model_copy(update={"video": video}),
                             keys=keys or RowKeys())


def table_rows(table: pa.Table, keys: RowKeys) -> tuple[list[Any], list[int]]:
    """The batch's rows and their indexes (``captionflow_index``, or their positions)."""
    names = [n for n in table.column_names if n not in STAGE_COLUMNS and n != INDEX]
    if ROW in names:
        rows = [orjson.loads(b) for b in table.column(ROW).to_pylist()]
    else:
        rows = table.select(names).to_pylist()
    indexes = table.column(INDEX).to_pylist() if INDEX in table.column_names \
        else list(range(table.num_rows))
    return rows, indexes


def decode_batch(table: pa.Table, *, settings: Settings, keys: RowKeys) -> pa.Table:
    rows, indexes = table_rows(table, keys)
    decoder = _decoder(settings.video)

    async def all_rows() -> list[tuple[Any, bytes | None, bytes | None]]:
        return await asyncio.gather(*(
            decode_row(row, i, source=decoder.source, settings=settings, keys=keys)
            for row, i in zip(rows, indexes, strict=True)))

    results = decoder.run(all_rows())
    table = table.drop_columns([n for n in STAGE_COLUMNS if n in table.column_names])
    table = table.append_column(FRAMES, frames_column([r[0] for r in results]))
    table = table.append_column(CLIPS, pa.array([r[1] for r in results], pa.binary()))
    return table.append_column(DECODE_ERROR, pa.array([r[2] for r in results], pa.binary()))


async def decode_row(row: Any, index: int, *, source: FrameSource, settings: Settings,
                     keys: RowKeys) -> tuple[Any, bytes | None, bytes | None]:
    """(frames, clips JSON, error JSON) of one row. A row that is not a valid event is
    passed on undecoded: the engine stage finds the same error as ``captionflow run``."""
    try:
        event = row_event(row, index, keys)
    except CaptionflowError:
        return EMPTY_FRAMES, None, None
    overrides = event.options.frame_overrides() if event.options else {}
    attempts = Attempts(settings.worker, label=f"row {index}")
    started = time.monotonic()
    stream = None
    try:
        stream = await attempts.run(lambda: source.open(event.reference, overrides))
        clips = []
        for w in range(stream.count):
            clips.append(await attempts.run(lambda w=w: stream.clip(w)))
        # The cache keys need the video's validator (a local file is hashed whole).
        validator = await stream.content_validator() if settings.cache.enabled else None
        identities = [stream.clip_identity(w) for w in range(stream.count)]
    except FatalError:
        raise
    except Exception as e:
        error = e if isinstance(e, CaptionflowError) else InternalError(
            f"unexpected {type(e).__name__}: {e}")
        if not isinstance(e, CaptionflowError):
            log.exception("row %d: bug while decoding", index)
        return EMPTY_FRAMES, None, pack_error(error)
    finally:
        if stream is not None:
            await stream.aclose()
    flat, meta = pack_clips(clips, identities=identities, validator=validator,
                            fetch_decode_s=time.monotonic() - started)
    return flat, meta, None


class _Decoder:
    """One FrameSource and the event loop it lives on, for the tasks of one Ray worker."""

    def __init__(self, video: VideoSettings) -> None:
        self.video = video
        self.closed = False
        # A loop of its own on a thread, so that the FrameSource and its decoder process
        # outlive each (synchronous) Ray task; the standard loop, as in the worker, whatever
        # policy Ray's worker installed.
        self.loop: asyncio.AbstractEventLoop = asyncio.SelectorEventLoop()
        threading.Thread(target=self.loop.run_forever, name="captionflow-decode-loop",
                         daemon=True).start()

        async def make() -> FrameSource:
            return FrameSource(video)

        self.source: FrameSource = self.run(make())

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.run(self.source.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)


_current: _Decoder | None = None
_lock = threading.Lock()


def _decoder(video: VideoSettings) -> _Decoder:
    global _current
    with _lock:
        if _current is not None and _current.video != video:
            _current.close()
            _current = None
        if _current is None:
            # Not closed at exit: its decoder sees the socket close and exits by itself.
            _current = _Decoder(video)
        return _current
