"""Caption a list of DataFlow rows concurrently through one backend.

At most ``concurrency`` rows (:func:`default_concurrency` when not given) are between
"decode started" and "caption received" at any time, so memory holds at most that many
decoded videos. A bad row records its error and the
run goes on; only a fatal error (dead engine) stops it, after a last checkpoint. Rows an
earlier output already captioned are carried over, not captioned again. The backend is
started on the first row that reaches the model, so a rerun with nothing left to caption
starts no engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from captionflow.batch.files import UnparsableLine
from captionflow.batch.rows import (
    RowKeys,
    already_captioned,
    captioned_row,
    failed_row,
    resumed_row,
    row_event,
)
from captionflow.cache import CaptionCache, open_cache
from captionflow.captioning import Attempts, CaptionFn, ClipsFn, caption_event
from captionflow.config import Settings
from captionflow.errors import (
    CaptionflowError,
    EngineDeadError,
    ErrorCode,
    ErrorKind,
    FatalError,
    InternalError,
)
from captionflow.serving.base import CaptionBackend, CaptionRequest, CaptionResult
from captionflow.serving.engine_plan import KV_MAX_SEQUENCES
from captionflow.serving.engine_setup import vllm_cpu_build
from captionflow.video.source import FrameSource

log = logging.getLogger(__name__)

CAPTIONED, FAILED, SKIPPED = "captioned", "failed", "skipped"


@dataclass
class BatchReport:
    total: int = 0
    captioned: int = 0
    skipped: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    engine_started: bool = False
    wall_s: float = 0.0

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    def summary(self) -> str:
        failed = ", ".join(f"{code} {n}" for code, n in sorted(self.failed.items()))
        return (f"{self.total} rows: captioned {self.captioned}, failed {self.failed_total}"
                f"{f' ({failed})' if failed else ''}, skipped {self.skipped} (already "
                f"captioned) in {self.wall_s:.1f} s"
                f"{'' if self.engine_started else '; no engine started'}")

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "captioned": self.captioned, "skipped": self.skipped,
                "failed": dict(self.failed), "engine_started": self.engine_started,
                "wall_s": round(self.wall_s, 3)}


OnRow = Callable[[int, str], None]
Checkpoint = Callable[[list[Any]], None]


class LazyBackend:
    """Starts the backend once, on the first request, while other rows keep decoding. A
    failed start is tried once only: ``start_error`` then ends the run."""

    def __init__(self, backend: CaptionBackend, report: BatchReport, *,
                 request_timeout_s: float) -> None:
        self._backend = backend
        self._report = report
        self._timeout_s = request_timeout_s
        self._lock = asyncio.Lock()
        self.started = False
        self.start_error: CaptionflowError | None = None

    async def prepare(self, requests: int) -> None:
        """The backend's :meth:`~CaptionBackend.prepare` for the whole job; a refusal
        (a model path that holds no model) is a start-up failure, like :meth:`caption`'s."""
        try:
            await self._backend.prepare(requests=requests)
        except CaptionflowError as e:
            self.start_error = e
            raise

    async def caption(self, request: CaptionRequest) -> CaptionResult:
        if not self.started:
            async with self._lock:
                if self.start_error is not None:
                    raise self.start_error
                if not self.started:
                    try:
                        await self._backend.prepare(sample=request)
                        await self._backend.start()
                    except CaptionflowError as e:
                        self.start_error = e
                        raise
                    except Exception as e:
                        self.start_error = EngineDeadError(
                            f"the {self._backend.name} backend failed to start: "
                            f"{type(e).__name__}: {e}")
                        raise self.start_error from e
                    self.started = self._report.engine_started = True
        return await self._backend.caption_tracked(request, timeout_s=self._timeout_s)


def default_concurrency(settings: Settings) -> int:
    """Rows in flight when the caller does not say: ``worker.max_in_flight``, or fewer when
    an in-process vLLM engine runs at most ``serving.max_num_seqs`` requests at a time
    (on a CPU build, what the engine plan sets when it is not given):
    that many plus one per decoder process keeps its batch full with the next rows decoding,
    and every row in flight holds its decoded frames in memory."""
    seqs = settings.serving.max_num_seqs
    if seqs is None and settings.serving.backend == "vllm" and vllm_cpu_build():
        seqs = KV_MAX_SEQUENCES  # what the engine plan gives a CPU engine
    if settings.serving.backend != "vllm" or seqs is None:
        return settings.worker.max_in_flight
    return min(settings.worker.max_in_flight, seqs + settings.video.decode_workers)


async def caption_row(row: Any, index: int, *, keys: RowKeys, settings: Settings,
                      clips: ClipsFn, caption: CaptionFn, cache: CaptionCache | None,
                      run_failed: Callable[[], bool] = lambda: False,
                      ) -> tuple[Any, str, str | None]:
    """One row in, its output row out, with the outcome and the error code (None when
    captioned): the one implementation behind ``captionflow run`` and the Ray stages.

    Errors of this row become its ``error``; a fatal error (dead engine, bad settings) and
    any error once ``run_failed()`` says the run itself failed (its engine did not start)
    are raised."""
    if isinstance(row, UnparsableLine):
        return row.as_row(), FAILED, ErrorCode.MALFORMED_JSON.value
    try:
        event = row_event(row, index, keys)
        result = await caption_event(event, clips=clips, caption=caption, settings=settings,
                                     attempts=Attempts(settings.worker, label=f"row {index}"),
                                     cache=cache)
    except FatalError:
        raise
    except Exception as e:
        if run_failed() or (isinstance(e, CaptionflowError) and e.kind is ErrorKind.FATAL):
            raise  # the run's fault (settings, engine start-up), not this row's
        error = e if isinstance(e, CaptionflowError) else InternalError(
            f"unexpected {type(e).__name__}: {e}")
        if not isinstance(e, CaptionflowError):
            log.exception("row %d: bug while captioning", index)
        return failed_row(row, keys, error), FAILED, error.code.value
    windows = result.window_captions()
    fields = result.quality_fields()
    if fields["cache"] is not None:
        fields["cache"] = fields["cache"].model_dump(mode="json")
    return captioned_row(row, keys, prompt=result.prompt, caption=result.text, fields={
        **fields,
        "windows": [w.model_dump(mode="json") for w in windows] if windows else None,
    }), CAPTIONED, None


async def caption_rows(rows: list[Any], *, settings: Settings, backend: CaptionBackend,
                       keys: RowKeys = RowKeys(), previous: list[Any] | None = None,
                       concurrency: int | None = None, on_row: OnRow | None = None,
                       checkpoint: Checkpoint | None = None,
                       checkpoint_interval_s: float = 5.0,
                       cache: CaptionCache | None | Literal["settings"] = "settings",
                       ) -> tuple[list[Any], BatchReport]:
    """Output rows (input order, one per input row) and the report.

    ``previous`` is an earlier output of the same input (resume). ``cache``: the caption
    cache (default: from ``settings.cache``), so a rerun asks the engine only what no
    earlier run (nor worker sharing the store) asked. ``checkpoint`` receives
    the output so far (unfinished rows as they came in) every ``checkpoint_interval_s`` and
    once at the end, also when a fatal error ends the run.
    """
    started = time.monotonic()
    report = BatchReport(total=len(rows))
    out: list[Any] = list(rows)
    done = already_captioned(rows, previous or [], keys)
    for i, prev in done.items():
        out[i] = resumed_row(rows[i], prev, keys)
        report.skipped += 1
        if on_row:
            on_row(i, SKIPPED)
    todo = iter([i for i in range(len(rows)) if i not in done])
    if cache == "settings":
        cache = open_cache(settings, model=str(backend.model_info().get("model", "")))
    lazy = LazyBackend(backend, report,
                        request_timeout_s=settings.serving.request_timeout_s)
    last_write = time.monotonic()

    def finish(i: int, outcome: str) -> None:
        nonlocal last_write
        if on_row:
            on_row(i, outcome)
        # No checkpoint before the engine runs: a start-up failure leaves the output as it was.
        if checkpoint and lazy.started and time.monotonic() - last_write >= checkpoint_interval_s:
            checkpoint(out)
            last_write = time.monotonic()

    async def one(i: int, frames: FrameSource) -> None:
        out[i], outcome, code = await caption_row(
            rows[i], i, keys=keys, settings=settings, clips=frames.open,
            caption=lazy.caption, cache=cache,
            run_failed=lambda: lazy.start_error is not None)
        if code is not None:
            report.failed[code] += 1
        else:
            report.captioned += 1
        finish(i, outcome)

    async def lane(frames: FrameSource) -> None:
        for i in todo:  # the lanes share one iterator: each row is taken exactly once
            await one(i, frames)

    lanes = min(max(1, concurrency or default_concurrency(settings)), len(rows) - len(done))
    try:
        if lanes > 0:  # a rerun with every row done starts no decoder (nor opens a GPU)
            async with FrameSource(settings.video) as frames, asyncio.TaskGroup() as group:
                group.create_task(lazy.prepare(len(rows) - len(done)))
                for _ in range(lanes):
                    group.create_task(lane(frames))
    except ExceptionGroup as eg:
        # Rows catch their own errors, so only a fatal one (settings, engine start-up, dead
        # engine) gets here; a start-up failure is reported as itself, once.
        raise (lazy.start_error or eg.exceptions[0]) from None
    finally:
        report.wall_s = time.monotonic() - started
        if checkpoint and lazy.start_error is None:
            checkpoint(out)
    return out, report
