"""The poison guard: a bad deploy must not drain a topic into the dead-letter topic.

When a wrong setting or a broken build makes every record fail the same way (every path
forbidden, every request invalid), the dead letters say nothing about the records. In the
spirit of Sentry Arroyo's dead-letter limits, the guard watches the last
``poison_window_records`` outcomes; once more than ``dead_letter_max_ratio`` of them are
dead letters with one code, it trips: the worker stops consuming and turns not ready with
that code, and records that would still be dead-lettered with it are held uncommitted, so
after the fix they are redelivered instead of lost to the dead-letter topic.

It judges only a full window, so a handful of bad records at start-up cannot trip it; a
ratio of 1 turns it off.
"""

from __future__ import annotations

import logging
from collections import Counter, deque

log = logging.getLogger(__name__)


class PoisonGuard:
    def __init__(self, *, window_records: int, max_ratio: float) -> None:
        self._window: deque[str | None] = deque(maxlen=window_records)
        self._counts: Counter[str] = Counter()
        self._max_ratio = max_ratio
        self.tripped_code: str | None = None

    @property
    def enabled(self) -> bool:
        return self._max_ratio < 1.0

    def record(self, error_code: str | None) -> bool:
        """Note one finished record (None = captioned); True if this trips the guard."""
        if not self.enabled or self.tripped_code is not None:
            return False
        if len(self._window) == self._window.maxlen:
            old = self._window[0]
            if old is not None:
                self._counts[old] -= 1
        self._window.append(error_code)
        if error_code is None:
            return False
        self._counts[error_code] += 1
        full = len(self._window) == self._window.maxlen
        if full and self._counts[error_code] > self._max_ratio * len(self._window):
            self.tripped_code = error_code
            log.error("poison guard tripped: %d of the last %d records were dead-lettered with "
                      "%s; consumption stopped. Fix the cause and restart the worker; held "
                      "records are redelivered", self._counts[error_code], len(self._window),
                      error_code)
            return True
        return False

    def holds(self, error_code: str | None) -> bool:
        """Whether a record about to be dead-lettered with ``error_code`` must be held."""
        return error_code is not None and error_code == self.tripped_code

    def describe(self) -> str:
        if self.tripped_code is None:
            return ""
        return (f"poison guard: more than {self._max_ratio:.0%} of the last "
                f"{self._window.maxlen} records dead-lettered with {self.tripped_code}")
