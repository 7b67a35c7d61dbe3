"""``captionflow run --ray``: one batch job over files, on a Ray cluster.

The driver reads the input and writes the output with the batch code of ``captionflow run``
(:mod:`captionflow.batch.files`: JSON, JSONL, CSV or parquet, local or ``s3://``), so
inputs, outputs, columns and error rows are the same. Rows an earlier output already
captioned are kept and never reach Ray. The others go through Ray Data: the CPU stage
(:func:`captionflow.ray.decode_stage`, Ray tasks) decodes them, and their frames travel
through the object store to a pool of :class:`captionflow.ray.CaptionActor` (one engine
each). Results come back to the driver by row index, so the output holds each row once,
in input order, whatever Ray retried; checkpoints are written as in ``captionflow run``.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from captionflow.batch.files import CacheType, UnparsableLine, read_rows, write_rows
from captionflow.batch.job import batch_video_settings, previous_output
from captionflow.batch.rows import RowKeys, already_captioned, resumed_row
from captionflow.batch.runner import (
    CAPTIONED,
    FAILED,
    SKIPPED,
    BatchReport,
    OnRow,
    default_concurrency,
)
from captionflow.config import Settings
from captionflow.errors import CaptionflowError, ConfigError, ErrorCode, InternalError
from captionflow.ray.actor import ERROR_CODE, STATS, CaptionActor
from captionflow.ray.decode import INDEX, ROW, decode_stage

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RayPlan:
    """How the job uses the cluster. ``address``: "auto" or ``ray://host:port`` joins a
    cluster; None joins ``RAY_ADDRESS`` when set, else starts a local cluster (``num_cpus``
    CPUs, all of this machine's when None). Batches of ``decode_batch_rows`` rows are one decode task; an engine takes
    ``caption_batch_rows`` rows at a time (default: the rows ``captionflow run`` keeps in
    flight) with the next batch already queued (``batches_per_engine``)."""

    address: str | None = None
    engines: int = 1
    num_cpus: int | None = None
    decode_batch_rows: int = 4
    caption_batch_rows: int | None = None
    batches_per_engine: int = 2
    decode_retries: int = 3
    max_restarts: int = 3
    max_task_retries: int = 3


@dataclass
class RayStats:
    """What the Ray path adds to the report: the seconds engines sat with no row (after
    their start) while rows were still to come, rows captioned by an engine actor that Ray
    restarted after its process died, and rows Ray delivered more than once (kept once in
    the output)."""

    engines: int = 0
    engine_wait_s: float = 0.0
    rows_after_restart: int = 0
    duplicates: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"engines": self.engines, "engine_wait_s": round(self.engine_wait_s, 3),
                "rows_after_restart": self.rows_after_restart,
                "duplicates": self.duplicates}


def connect(address: str | None, *, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` ("auto", ``ray://host:port``), or at ``RAY_ADDRESS``
    when None and that is set (a Ray job's driver), or start a local one (None, "local")."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address in (None, "local"):
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)


def engine_gpus(settings: Settings) -> int:
    """GPUs per engine actor: ``serving.tensor_parallel_size`` on a cluster with GPUs, none
    on a CPU-only cluster (the CPU engine)."""
    import ray

    return settings.serving.tensor_parallel_size \
        if ray.cluster_resources().get("GPU", 0) > 0 else 0


def build_dataset(items: list[dict[str, Any]], *, settings: Settings, keys: RowKeys,
                  plan: RayPlan) -> Any:
    """The Ray Data pipeline: rows -> decode tasks -> engine actors."""
    import ray.data
    from ray.util.annotations import RayDeprecationWarning

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the CLI draws its own
    rows = ray.data.from_items(
        items, override_num_blocks=max(1, math.ceil(len(items) / plan.decode_batch_rows)))
    caption_rows = plan.caption_batch_rows or default_concurrency(settings)
    with warnings.catch_warnings():
        # Ray 2.60 warns that ``ray_remote_args`` go away in 2.64 and offers no other way
        # to bound retries (its defaults retry and restart forever: an engine that a row
        # kills every time would never end the job). The extra pins ray below 2.64.
        warnings.simplefilter("ignore", RayDeprecationWarning)
        decoded = rows.map_batches(
            decode_stage(settings, keys), batch_format="pyarrow",
            batch_size=plan.decode_batch_rows, num_cpus=1, max_retries=plan.decode_retries)
        return decoded.map_batches(
            CaptionActor, fn_constructor_kwargs={"settings": settings, "keys": keys},
            batch_format="pyarrow", batch_size=caption_rows,
            compute=ray.data.ActorPoolStrategy(
                size=plan.engines, max_tasks_in_flight_per_actor=plan.batches_per_engine),
            num_cpus=1, num_gpus=engine_gpus(settings),
            max_restarts=plan.max_restarts, max_task_retries=plan.max_task_retries)


def results(dataset: Any) -> Iterator[tuple[int, Any, str | None, dict[str, Any]]]:
    """(index, output row, error code, stats) of each row, as they come back."""
    try:
        for table in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            columns = table.select([INDEX, ROW, ERROR_CODE, STATS]).to_pydict()
            for i, row, code, stats in zip(columns[INDEX], columns[ROW], columns[ERROR_CODE],
                                           columns[STATS], strict=True):
                yield i, orjson.loads(row), code, orjson.loads(stats)
    except CaptionflowError:
        raise
    except Exception as e:
        raise job_error(e) from e


def job_error(e: BaseException) -> CaptionflowError:
    """The captionflow error that ended the Ray job (an engine that did not start, a fatal
    decode error), found in Ray's wrapping; else an internal error naming Ray's."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [e]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, CaptionflowError):
            return cur
        stack += [getattr(cur, "cause", None), cur.__cause__, cur.__context__]
    return InternalError(f"the Ray job failed: {type(e).__name__}: {e}")


def run_ray_file(input_path: str | Path, output_path: str | Path, *, cache_type: CacheType,
                 settings: Settings, keys: RowKeys | None = None, plan: RayPlan | None = None,
                 resume: bool = True, on_row: OnRow | None = None,
                 on_total: Callable[[int], None] | None = None,
                 checkpoint_interval_s: float = 5.0) -> tuple[BatchReport, RayStats]:
    """Caption every row of ``input_path`` into ``output_path`` on Ray (rows in input
    order), as :func:`captionflow.batch.job.run_file` does on this machine."""
    keys, plan = keys or RowKeys(), plan or RayPlan()
    if plan.engines < 1:
        raise ConfigError(f"--ray-engines must be at least 1, got {plan.engines}")
    started = time.monotonic()
    rows = read_rows(input_path, video=settings.video)
    if on_total:
        on_total(len(rows))
    output_path = Path(output_path)
    previous = previous_output(output_path, settings.video) if resume else None
    report, stats = BatchReport(total=len(rows)), RayStats(engines=plan.engines)
    out: list[Any] = list(rows)

    def finish(i: int, outcome: str) -> None:
        if on_row:
            on_row(i, outcome)

    for i, prev in already_captioned(rows, previous or [], keys).items():
        out[i] = resumed_row(rows[i], prev, keys)
        report.skipped += 1
        finish(i, SKIPPED)
    items = []
    for i, row in enumerate(rows):
        if isinstance(row, UnparsableLine):
            out[i] = row.as_row()
            report.failed[ErrorCode.MALFORMED_JSON.value] += 1
            finish(i, FAILED)
        elif out[i] is row:  # not resumed
            items.append({INDEX: i, ROW: orjson.dumps(row)})

    def checkpoint() -> None:
        write_rows(output_path, out, cache_type, video=settings.video)

    if not items:  # nothing to caption: no cluster, no engine
        report.wall_s = time.monotonic() - started
        checkpoint()
        return report, stats
    settings = batch_video_settings(settings)
    connect(plan.address, num_cpus=plan.num_cpus)
    dataset = build_dataset(items, settings=settings, keys=keys, plan=plan)
    seen: set[int] = set()
    last_write = time.monotonic()
    try:
        for i, row, code, row_stats in results(dataset):
            if i in seen:
                stats.duplicates += 1
                continue
            seen.add(i)
            out[i] = row
            stats.engine_wait_s += row_stats["engine_wait_s"]
            report.engine_started |= row_stats["engine_started"]
            stats.rows_after_restart += row_stats["restarted"]
            if code is None:
                report.captioned += 1
            else:
                report.failed[code] += 1
            finish(i, CAPTIONED if code is None else FAILED)
            if time.monotonic() - last_write >= checkpoint_interval_s:
                checkpoint()
                last_write = time.monotonic()
    finally:
        report.wall_s = time.monotonic() - started
        if seen:  # an engine ran: keep what it made, as captionflow run does
            checkpoint()
    missing = len(items) - len(seen)
    if missing:
        raise InternalError(f"the Ray job ended with {missing} rows unaccounted for")
    return report, stats
