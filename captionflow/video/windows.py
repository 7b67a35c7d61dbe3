"""Split a long video into windows, each captioned as its own request (dense captions).

cosmos-curate's rule, in seconds: windows of ``window_s`` starting every
``window_s - overlap_s``; a last piece shorter than ``min_remainder_s`` is merged into the
window before it, a longer one becomes its own window.
"""

from __future__ import annotations

from dataclasses import dataclass

_EPS_S = 1e-6


@dataclass(frozen=True, slots=True)
class Window:
    index: int
    start_s: float
    end_s: float


def plan_windows(start_s: float, end_s: float, *, window_s: float, overlap_s: float = 0.0,
                 min_remainder_s: float = 0.0) -> list[Window]:
    """Windows covering ``[start_s, end_s]``; one window when ``window_s`` is 0 or the span
    fits in one."""
    if end_s <= start_s:
        raise ValueError(f"window span start_s={start_s} must be before end_s={end_s}")
    if window_s <= 0 or end_s - start_s <= window_s + _EPS_S:
        return [Window(0, start_s, end_s)]
    if not 0 <= overlap_s < window_s:
        raise ValueError(f"overlap_s={overlap_s} must be in [0, window_s={window_s})")
    stride_s = window_s - overlap_s
    spans: list[tuple[float, float]] = []
    begin = start_s
    while True:
        stop = begin + window_s
        if stop >= end_s - _EPS_S:
            spans.append((begin, end_s))
            break
        spans.append((begin, stop))
        begin += stride_s
    # The last window only holds what the one before it did not: merge it when too short.
    if len(spans) > 1:
        last_new_s = end_s - spans[-2][1]
        if last_new_s < min_remainder_s - _EPS_S:
            spans[-2] = (spans[-2][0], end_s)
            spans.pop()
    return [Window(i, round(a, 6), round(b, 6)) for i, (a, b) in enumerate(spans)]
