"""Sampling real encoded files: the right frames, the right facts, the right errors."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from captionflow.config import VideoSettings
from captionflow.errors import CaptionflowError, ErrorCode
from captionflow.video.clip import Clip
from captionflow.video.sampling import SamplingPolicy
from captionflow.video.source import FrameSource, load_clips
from tests.support.corpus import VFR_PTS_S, CorpusFile, read_index

GOOD = ["h264_160x120_30fps.mp4", "h264_longgop_128x96_25fps.mp4",
        "h264_gop10_128x96_25fps_10s.mp4", "hevc_128x96_24fps.mp4", "vp9_odd_65x49_15fps.webm",
        "av1_96x64_24fps.mkv", "mpeg4_176x144_10fps.avi", "h264_rotated90_96x64.mp4",
        "h264_vfr_96x64.mp4", "still.png", "still.jpg"]
BAD = ["audio_only.m4a", "zero_length.mp4", "no_frames.mkv", "truncated.mp4",
       "not_a_video.mp4", "bitflip_header.mp4", "bitflip_payload.webm"]
# A hang guard only, not a performance claim: each of these files is a few kB.
BOUND_S = 10.0


@pytest.fixture
def settings(video_corpus_dir: Path) -> VideoSettings:
    # Small frames keep the suite fast; the rules are the same at any size.
    return VideoSettings(allowed_roots=(video_corpus_dir,), min_pixels=4 * 784,
                         max_pixels=64 * 784, decode_workers=2)


def expected_indices(file: CorpusFile, policy: SamplingPolicy) -> list[int]:
    n_total = file.frames
    if n_total < 2:
        return [0, 0]
    return policy.frame_indices(n_total, file.fps)[0]


def upright_codes(clip: Clip) -> list[int]:
    # The corpus draws codes in the coded orientation; frames come back turned for display.
    turns = -(clip.facts.rotation_deg // 90)
    return [read_index(np.rot90(f, k=turns) if turns else f) for f in clip.frames]


def check_clip(clip: Clip, file: CorpusFile, policy: SamplingPolicy) -> None:
    want = expected_indices(file, policy)
    assert list(clip.frame_indices) == want
    assert upright_codes(clip) == (want if file.frames > 1 else [5, 5])
    assert clip.frames.dtype == np.uint8 and clip.frames.ndim == 4 and clip.frames.shape[3] == 3
    t, h, w, _ = clip.frames.shape
    assert t % 2 == 0 and h % 28 == 0 and w % 28 == 0
    if file.vfr:
        first = VFR_PTS_S[0]
        assert clip.timestamps_s == pytest.approx([VFR_PTS_S[i] - first for i in want], abs=2e-3)
    elif file.frames > 1:
        assert clip.timestamps_s == pytest.approx([i / file.fps for i in want], abs=2e-3)
    assert not clip.extra["linear_fallback"], "the fast path missed a sampled frame"


@pytest.mark.parametrize("name", GOOD)
@pytest.mark.parametrize("overrides", [None, {"fps": 0.5}, {"nframes": 6},
                                       {"fps": 4.0, "start_s": 0.3, "end_s": 0.9}])
def test_sampled_frames_are_exactly_the_policy_frames(
        name: str, overrides: dict | None, video_corpus: dict[str, CorpusFile],
        settings: VideoSettings) -> None:
    file = video_corpus[name]
    policy = SamplingPolicy.from_settings(settings, overrides)
    if file.frames > 1 and overrides and "start_s" in overrides:
        want_range = policy.frame_range(file.frames, file.fps)
        assert want_range[0] >= 1
    [clip] = load_clips(file.path, settings, overrides)
    check_clip(clip, file, policy)


@pytest.mark.parametrize("name", GOOD)
def test_facts_describe_the_source(name: str, video_corpus: dict[str, CorpusFile],
                                   settings: VideoSettings) -> None:
    file = video_corpus[name]
    [clip] = load_clips(file.path, settings)
    facts = clip.facts
    assert facts.total_frames == file.frames
    assert (facts.width, facts.height) == (file.width, file.height)
    assert facts.codec == file.codec
    assert facts.rotation_deg == file.rotation_deg
    assert facts.size_bytes == Path(file.path).stat().st_size
    if file.frames > 1:
        assert facts.source_fps == pytest.approx(file.fps, rel=0.01)
        assert facts.duration_s == pytest.approx(file.frames / file.fps, rel=0.01)
    # The model sees the clip in its own numbering at the sampled rate (Clip.vllm_metadata).
    meta = clip.vllm_metadata()
    assert meta["frames_indices"] == list(range(clip.num_frames))
    assert meta["total_num_frames"] == clip.num_frames and meta["do_sample_frames"] is False
    assert meta["fps"] == clip.sample_fps
    assert len(meta["frames_indices"]) / meta["total_num_frames"] * meta["fps"] == \
        pytest.approx(clip.sample_fps)


def test_rotated_video_comes_back_upright(video_corpus: dict[str, CorpusFile],
                                          settings: VideoSettings) -> None:
    [clip] = load_clips(video_corpus["h264_rotated90_96x64.mp4"].path, settings)
    _, h, w, _ = clip.frames.shape
    assert h > w  # 96x64 coded, shown turned a quarter: taller than wide


def test_far_apart_samples_seek_instead_of_decoding_every_gop(
        video_corpus: dict[str, CorpusFile], settings: VideoSettings) -> None:
    file = video_corpus["h264_gop10_128x96_25fps_10s.mp4"]
    [clip] = load_clips(file.path, settings, {"nframes": 4})
    check_clip(clip, file, SamplingPolicy.from_settings(settings, {"nframes": 4}))
    assert clip.extra["seeks"] >= 2
    assert clip.extra["packets_decoded"] < file.frames / 2


def test_long_gop_skips_frames_nothing_depends_on(
        video_corpus: dict[str, CorpusFile], settings: VideoSettings) -> None:
    file = video_corpus["h264_longgop_128x96_25fps.mp4"]
    [clip] = load_clips(file.path, settings, {"fps": 0.5})
    check_clip(clip, file, SamplingPolicy.from_settings(settings, {"fps": 0.5}))
    # B-frames that are not sampled are dropped by the codec, not decoded and thrown away.
    assert clip.extra["frames_decoded"] < clip.extra["packets_decoded"]


def test_windows_cover_the_video(video_corpus: dict[str, CorpusFile],
                                 video_corpus_dir: Path) -> None:
    file = video_corpus["h264_gop10_128x96_25fps_10s.mp4"]
    settings = VideoSettings(allowed_roots=(video_corpus_dir,), min_pixels=4 * 784,
                             max_pixels=64 * 784, window_s=4.0, window_overlap_s=1.0,
                             window_min_remainder_s=2.0)
    clips = load_clips(file.path, settings)
    assert [(c.window_index, c.start_s, c.end_s) for c in clips] == [
        (0, 0.0, 4.0), (1, 3.0, 7.0), (2, 6.0, 10.0)]
    for clip in clips:
        assert upright_codes(clip) == list(clip.frame_indices)
        assert clip.start_s - 0.04 <= clip.timestamps_s[0] and \
            clip.timestamps_s[-1] <= clip.end_s
        policy = SamplingPolicy(fps=2.0, min_pixels=4 * 784, max_pixels=64 * 784,
                                start_s=clip.start_s, end_s=clip.end_s)
        assert list(clip.frame_indices) == policy.frame_indices(file.frames, file.fps)[0]


@pytest.mark.parametrize("name", BAD)
def test_bad_files_give_their_documented_code(name: str, video_corpus: dict[str, CorpusFile],
                                              settings: VideoSettings) -> None:
    file = video_corpus[name]
    started = time.monotonic()
    if file.error is None:
        try:
            [clip] = load_clips(file.path, settings)
        except CaptionflowError as e:
            assert e.code in file.errors_allowed
        else:
            assert clip.frames.dtype == np.uint8 and clip.num_frames % 2 == 0
    else:
        with pytest.raises(CaptionflowError) as info:
            load_clips(file.path, settings)
        assert info.value.code == file.error, info.value
        assert not info.value.retriable
    assert time.monotonic() - started < BOUND_S


def test_too_long_video_is_refused(video_corpus: dict[str, CorpusFile],
                                   video_corpus_dir: Path) -> None:
    settings = VideoSettings(allowed_roots=(video_corpus_dir,), max_duration_s=5.0)
    with pytest.raises(CaptionflowError) as info:
        load_clips(video_corpus["h264_longgop_128x96_25fps.mp4"].path, settings)
    assert info.value.code == ErrorCode.VIDEO_TOO_LONG


async def test_frame_source_decodes_concurrently_off_the_loop(
        video_corpus: dict[str, CorpusFile], settings: VideoSettings) -> None:
    names = ["h264_160x120_30fps.mp4", "hevc_128x96_24fps.mp4", "vp9_odd_65x49_15fps.webm",
             "h264_gop10_128x96_25fps_10s.mp4"]
    ticks = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    beat = asyncio.create_task(heartbeat())
    async with FrameSource(settings) as source:
        results = await asyncio.gather(
            *(source.clips(video_corpus[n].path) for n in names),
            source.clips(video_corpus["truncated.mp4"].path), return_exceptions=True)
    beat.cancel()
    for name, result in zip(names, results, strict=False):
        file = video_corpus[name]
        check_clip(result[0], file, SamplingPolicy.from_settings(settings))
    assert isinstance(results[-1], CaptionflowError)
    assert results[-1].code == ErrorCode.VIDEO_UNREADABLE
    assert ticks > 1  # the loop kept running while the pool decoded
