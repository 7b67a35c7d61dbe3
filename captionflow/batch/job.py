"""One batch job over files: input rows from a DataFlow file, output rows to another, with
checkpoints and resume from what that output already holds."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from captionflow.batch.files import CacheType, read_rows, write_rows
from captionflow.batch.remote import read_remote, remote_url
from captionflow.batch.rows import RowKeys
from captionflow.batch.runner import BatchReport, OnRow, caption_rows
from captionflow.config import Settings, VideoSettings
from captionflow.errors import CaptionflowError
from captionflow.serving.base import CaptionBackend

log = logging.getLogger(__name__)


def batch_video_settings(settings: Settings) -> Settings:
    """Batch rows name the user's own files, wherever they are, as DataFlow opens them: the
    OS user's permissions are the boundary, and ``video.allowed_roots`` applies when set.
    Likewise ``s3://`` objects are read with the user's own AWS credentials."""
    schemes = tuple(dict.fromkeys((*settings.video.allowed_schemes, "s3")))
    video = settings.video.model_copy(update={"any_local_path": True,
                                              "allowed_schemes": schemes})
    return settings.model_copy(update={"video": video})


def previous_output(output_path: Path, video: VideoSettings | None = None) -> list | None:
    """The rows an earlier run left in ``output_path`` (a file or an ``s3://`` object); None
    (and a warning) when there are none or they cannot be read, so the run starts from
    scratch."""
    url = remote_url(output_path)
    if url is None and not output_path.is_file():
        return None
    try:
        if url is not None and read_remote(url, video) is None:
            return None
        return read_rows(output_path, video=video)
    except CaptionflowError as e:
        log.warning("not resuming from %s: %s", output_path, e.message)
        return None


async def run_file(input_path: str | Path, output_path: str | Path, *, cache_type: CacheType,
                   settings: Settings, backend: CaptionBackend, keys: RowKeys = RowKeys(),
                   concurrency: int | None = None, resume: bool = True,
                   on_row: OnRow | None = None,
                   on_total: Callable[[int], None] | None = None,
                   checkpoint_interval_s: float = 5.0) -> BatchReport:
    """Caption every row of ``input_path`` into ``output_path`` (rows in input order)."""
    rows = read_rows(input_path, video=settings.video)
    if on_total:
        on_total(len(rows))
    output_path = Path(output_path)
    previous = previous_output(output_path, settings.video) if resume else None
    _, report = await caption_rows(
        rows, settings=batch_video_settings(settings), backend=backend, keys=keys,
        previous=previous, concurrency=concurrency, on_row=on_row,
        checkpoint=lambda out: write_rows(output_path, out, cache_type, video=settings.video),
        checkpoint_interval_s=checkpoint_interval_s)
    return report
