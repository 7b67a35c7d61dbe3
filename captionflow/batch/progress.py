"""The batch progress bar (rich): rows done of total, with the outcome counts so far."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class RowProgress:
    """``on_total`` and ``on_row`` callbacks for :func:`captionflow.batch.job.run_file`."""

    def __init__(self, progress: Progress, label: str) -> None:
        self._progress = progress
        self._task = progress.add_task(label, total=None, counts="")
        self._counts: Counter[str] = Counter()

    def on_total(self, total: int) -> None:
        self._progress.update(self._task, total=total)

    def on_row(self, index: int, outcome: str) -> None:
        self._counts[outcome] += 1
        self._progress.update(self._task, advance=1, counts=" ".join(
            f"{k} {v}" for k, v in sorted(self._counts.items())))


@contextlib.contextmanager
def row_progress(console: Console, *, enabled: bool | None = None,
                 label: str = "captioning") -> Iterator[RowProgress]:
    """A bar on ``console``, shown only on a terminal unless ``enabled`` says otherwise."""
    show = console.is_terminal if enabled is None else enabled
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[counts]}"), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, disable=not show) as progress:
        yield RowProgress(progress, label)
