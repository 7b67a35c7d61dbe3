"""The sampling policy alone: qwen-vl-utils' frame counts, sizes, ranges and overrides."""

from __future__ import annotations

import math

import numpy as np
import pytest

from captionflow.config import VideoSettings
from captionflow.errors import ErrorCode, InvalidRequestError
from captionflow.video.sampling import SamplingPolicy, smart_resize
from captionflow.video.windows import plan_windows

DEFAULTS = SamplingPolicy.from_settings(VideoSettings())


def qwen_nframes(total: int, fps: float, *, target_fps: float = 2.0, min_frames: int = 4,
                 max_frames: int = 768) -> int:
    """qwen-vl-utils 0.0.x ``smart_nframes``, transcribed for comparison."""
    min_f = math.ceil(min_frames / 2) * 2
    max_f = math.floor(min(max_frames, total) / 2) * 2
    n = total / fps * target_fps
    n = min(min(max(n, min_f), max_f), total)
    return math.floor(n / 2) * 2


@pytest.mark.parametrize(("total", "fps"), [(90, 30.0), (250, 25.0), (3000, 25.0),
                                            (18000, 30.0), (48, 24.0), (7, 10.0), (3, 30.0)])
def test_frame_indices_match_qwen_vl_utils(total: int, fps: float) -> None:
    indices, sample_fps = DEFAULTS.frame_indices(total, fps)
    n = qwen_nframes(total, fps)
    assert len(indices) == n and n % 2 == 0
    assert indices == np.linspace(0, total - 1, n).round().astype(int).tolist()
    assert sample_fps == pytest.approx(n / total * fps)


def test_long_video_is_capped_at_max_frames() -> None:
    indices, sample_fps = DEFAULTS.frame_indices(30 * 3600, 30.0)
    assert len(indices) == 768
    assert sample_fps == pytest.approx(768 / 3600)


def test_fixed_nframes_and_still_image() -> None:
    policy = SamplingPolicy.from_settings(VideoSettings(), {"nframes": 7})
    # qwen-vl-utils rounds a fixed count to the temporal factor: 7 -> 8.
    assert policy.frame_indices(100, 25.0)[0] == \
        np.linspace(0, 99, 8).round().astype(int).tolist()
    assert DEFAULTS.frame_indices(1, 25.0)[0] == [0, 0]


def test_start_end_range_uses_qwen_rounding() -> None:
    policy = SamplingPolicy.from_settings(VideoSettings(), {"start_s": 1.01, "end_s": 3.0})
    # start = ceil(1.01 * 10) = 11, end = floor(3.0 * 10) = 30: 20 frames at 10 fps -> 4.
    assert policy.frame_range(100, 10.0) == (11, 30)
    assert policy.frame_indices(100, 10.0)[0] == [11, 17, 24, 30]
    with pytest.raises(InvalidRequestError):
        SamplingPolicy.from_settings(VideoSettings(), {"start_s": 20.0}).frame_range(100, 10.0)


@pytest.mark.parametrize(("h", "w", "n"), [(1080, 1920, 20), (720, 1280, 768), (49, 65, 4),
                                           (1920, 1080, 100), (240, 320, 2)])
def test_frame_size_is_multiple_of_28_within_budget(h: int, w: int, n: int) -> None:
    out_h, out_w = DEFAULTS.frame_size(h, w, n)
    assert out_h % 28 == 0 and out_w % 28 == 0
    budget = max(min(DEFAULTS.max_pixels, DEFAULTS.total_pixels / n * 2),
                 int(DEFAULTS.min_pixels * 1.05))
    # Flooring to fit the budget may land a little under min_pixels, as in qwen-vl-utils.
    assert 0.8 * min(DEFAULTS.min_pixels, budget) <= out_h * out_w <= budget
    assert out_w / out_h == pytest.approx(w / h, rel=0.15)


def test_smart_resize_matches_reference_values() -> None:
    # Worked by hand from the formula: 1080x1920 is over 768*28^2, so both sides are scaled
    # by sqrt(1080*1920/602112) = 1.856 and floored to multiples of 28; 100x100 is under
    # 128*28^2, so scaled up by sqrt(100352/10000) and ceiled.
    assert smart_resize(1080, 1920, min_pixels=128 * 784, max_pixels=768 * 784) == (560, 1008)
    assert smart_resize(100, 100, min_pixels=128 * 784, max_pixels=768 * 784) == (336, 336)
    with pytest.raises(InvalidRequestError):
        smart_resize(1, 1000, min_pixels=1, max_pixels=10**6)


def test_overrides_are_clamped_to_configured_limits() -> None:
    settings = VideoSettings(max_frames=64, max_pixels=256 * 784, total_pixels=4096 * 784)
    policy = SamplingPolicy.from_settings(settings, {
        "fps": 30.0, "max_frames": 10_000, "max_pixels": 10**9, "total_pixels": 10**12,
        "min_pixels": 1, "nframes": None})
    assert policy.fps == 30.0  # a rate is fine; the frame cap bounds the work
    assert policy.max_frames == 64
    assert policy.max_pixels == 256 * 784
    assert policy.total_pixels == 4096 * 784
    assert policy.min_pixels == settings.min_pixels
    assert SamplingPolicy.from_settings(settings, {"nframes": 1000}).nframes == 64
    assert SamplingPolicy.from_settings(settings, {"max_frames": 8}).max_frames == 8


@pytest.mark.parametrize("overrides", [
    {"fps": 1.0, "nframes": 8}, {"fps": -1.0}, {"fps": 0}, {"nframes": float("nan")},
    {"max_pixels": "big"}, {"start_s": 5.0, "end_s": 2.0}, {"colour": 1}, {"fps": True}])
def test_impossible_overrides_are_invalid_requests(overrides: dict) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingPolicy.from_settings(VideoSettings(), overrides)
    assert info.value.code == ErrorCode.INVALID_REQUEST


def test_windows_follow_the_cosmos_curate_rule() -> None:
    # 256-frame windows at 1 fps = 256 s; remainder >= 128 s is its own window.
    spans = [(w.start_s, w.end_s) for w in plan_windows(
        0, 700, window_s=256, min_remainder_s=128)]
    assert spans == [(0, 256), (256, 512), (512, 700)]
    spans = [(w.start_s, w.end_s) for w in plan_windows(
        0, 600, window_s=256, min_remainder_s=128)]
    assert spans == [(0, 256), (256, 600)]  # 88 s left over: merged
    spans = [(w.start_s, w.end_s) for w in plan_windows(
        10, 40, window_s=10, overlap_s=2, min_remainder_s=0)]
    assert spans == [(10, 20), (18, 28), (26, 36), (34, 40)]
    assert [w.index for w in plan_windows(0, 5, window_s=10)] == [0]
