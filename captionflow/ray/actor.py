"""The engine stage: a Ray actor holding one serving backend (one engine), captioning the
rows that :func:`captionflow.ray.decode_stage` decoded, with the code behind
``captionflow run`` (:func:`captionflow.batch.runner.caption_row`): the quality gate,
prompts, structured output, windows, summaries and the caption cache are the same.

A row that fails gets its ``error``; the job goes on. When the engine dies under a running
actor, the actor process exits, so that Ray restarts it (``max_restarts``) and runs its
unfinished batches again on the new engine (``max_task_retries``): rows are retried, not
lost. An engine that cannot start at all fails the job, with the reason.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import orjson
import pyarrow as pa

from captionflow.batch.job import batch_video_settings
from captionflow.batch.rows import RowKeys
from captionflow.batch.runner import BatchReport, LazyBackend, caption_row
from captionflow.cache import open_cache
from captionflow.config import Settings
from captionflow.errors import FatalError, InternalError
from captionflow.ray.decode import ROW, table_rows
from captionflow.ray.frames import (
    CLIPS,
    DECODE_ERROR,
    EMPTY_FRAMES,
    FRAMES,
    STAGE_COLUMNS,
    DecodedClips,
    column_arrays,
    unpack_clips,
    unpack_error,
)
from captionflow.serving.factory import make_backend
from captionflow.video.clip import ClipStream

log = logging.getLogger(__name__)

ERROR_CODE = "captionflow_error"
STATS = "captionflow_stats"
# The exit status of an actor whose engine died: Ray restarts it.
ENGINE_DIED_EXIT = 70


class CaptionActor:
    """A callable class for ``Dataset.map_batches(CaptionActor, batch_format="pyarrow",
    fn_constructor_kwargs={"settings": settings}, concurrency=N)`` after
    :func:`captionflow.ray.decode_stage`.

    Each batch comes back with ``captionflow_row`` (the output row as ``captionflow run``
    writes it, JSON: caption, ``caption_*`` fields or ``error``), the caption in the
    ``keys.output`` column (null when the row failed), ``captionflow_error`` (the error
    code, or null) and ``captionflow_stats`` (JSON: whether the engine had started, and
    the seconds this actor sat with no row since its previous batch, and whether Ray
    restarted this actor after its process died); the frames are
    dropped, other columns pass through. The engine starts with the first batch."""

    def __init__(self, settings: Settings | None = None, keys: RowKeys | None = None) -> None:
        self.settings = batch_video_settings(settings or Settings.load())
        self.keys = keys or RowKeys()
        self.backend = make_backend(self.settings.serving, self.settings.video)
        self.report = BatchReport()
        self.lazy = LazyBackend(self.backend, self.report,
                                request_timeout_s=self.settings.serving.request_timeout_s)
        self.cache = open_cache(self.settings,
                                model=str(self.backend.model_info().get("model", "")))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_flight = 0
        self._idle_since: float | None = None
        self._wait_s = 0.0
        self.restarted = _restarted_actor()

    async def __call__(self, table: pa.Table) -> pa.Table:
        self._loop = asyncio.get_running_loop()
        rows, indexes = table_rows(table, self.keys)
        n = len(rows)
        frames = column_arrays(table.column(FRAMES)) if FRAMES in table.column_names \
            else [EMPTY_FRAMES] * n
        clips = table.column(CLIPS).to_pylist() if CLIPS in table.column_names else [None] * n
        errors = table.column(DECODE_ERROR).to_pylist() if DECODE_ERROR in table.column_names \
            else [None] * n
        self._enter(n)
        try:
            results = await asyncio.gather(*(
                self._one(rows[k], indexes[k], frames[k], clips[k], errors[k])
                for k in range(n)))
        except FatalError as e:
            if self.lazy.started and self.lazy.start_error is None:
                # The engine died under us: a fresh actor (Ray restarts this one) runs the
                # batches again; exiting is the only way to get a fresh engine.
                log.error("the engine died (%s); exiting so that Ray restarts this actor", e)
                logging.shutdown()
                os._exit(ENGINE_DIED_EXIT)
            raise
        finally:
            wait_s = self._leave(n)
        return self._output(table, results, wait_s)

    async def _one(self, row: Any, index: int, flat: Any, meta: bytes | None,
                   error: bytes | None) -> tuple[Any, str | None]:
        async def clips(reference: str, overrides: Any) -> ClipStream:
            if error is not None:
                raise unpack_error(error)
            if meta is None:
                raise InternalError("the row has no decoded frames: put "
                                    "captionflow.ray.decode_stage before CaptionActor")
            return DecodedClips(*unpack_clips(flat, meta))

        out, _, code = await caption_row(
            row, index, keys=self.keys, settings=self.settings, clips=clips,
            caption=self.lazy.caption, cache=self.cache,
            run_failed=lambda: self.lazy.start_error is not None)
        return out, code

    def _output(self, table: pa.Table, results: list[tuple[Any, str | None]],
                wait_s: float) -> pa.Table:
        out_key = self.keys.output
        drop = [n for n in (*STAGE_COLUMNS, ROW, out_key, ERROR_CODE, STATS)
                if n in table.column_names]
        table = table.drop_columns(drop)
        captions = [r[out_key] if code is None else None for r, code in results]
        first = {"engine_started": self.lazy.started, "restarted": self.restarted}
        stats = orjson.dumps({**first, "engine_wait_s": wait_s})
        table = table.append_column(ROW, pa.array([orjson.dumps(r) for r, _ in results],
                                                  pa.binary()))
        table = table.append_column(out_key, pa.array(captions, pa.string()))
        table = table.append_column(ERROR_CODE, pa.array([c for _, c in results], pa.string()))
        # The wait rides on the batch's first row, so that the rows' sum is the actor's.
        nothing = orjson.dumps({**first, "engine_wait_s": 0.0})
        return table.append_column(STATS, pa.array(
            [stats if k == 0 else nothing for k in range(table.num_rows)], pa.binary()))

    def _enter(self, n: int) -> None:
        now = time.monotonic()
        if self._in_flight == 0 and self._idle_since is not None:
            self._wait_s += now - self._idle_since
            self._idle_since = None
        self._in_flight += n

    def _leave(self, n: int) -> float:
        """The time this actor had no rows at all since its engine started, reported once."""
        self._in_flight -= n
        if self._in_flight == 0 and self.lazy.started:
            self._idle_since = time.monotonic()
        wait_s, self._wait_s = self._wait_s, 0.0
        return wait_s

    def __del__(self) -> None:
        # Ray Data drops the actor's UDF when the pool shuts down gracefully: close the
        # engine (its own processes) before the actor process goes.
        loop = self._loop
        if loop is None or not self.lazy.started or loop.is_closed():
            return
        if asyncio._get_running_loop() is loop:
            return  # dropped on the loop itself: the engine's processes end with us
        try:
            asyncio.run_coroutine_threadsafe(self.backend.close(), loop).result(timeout=60)
        except Exception as e:  # the process is going anyway
            log.warning("closing the engine failed: %s", e)



def _restarted_actor() -> bool:
    """Whether this is a Ray actor that Ray restarted (its previous process died)."""
    import ray

    if not ray.is_initialized():
        return False
    try:
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # not in an actor (a test calling the class directly)
        return False
