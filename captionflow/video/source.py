"""The decode stage's front door: a reference in, sampled clips out.

``load_clips`` does the work synchronously, in this process (tests, benchmarks, tools).
``FrameSource`` is what the worker and batch mode use: the fetch runs in a daemon thread
(its wall-clock deadline ends it; shutdown never waits for it), the probe and every decode
run in a :class:`captionflow.video.pool.DecodePool` child process, so a crash or a memory
blow-up in FFmpeg fails one event and never the worker. ``FrameSource.open`` fetches and
probes once and decodes each window only when asked, so a long video costs the frames of
the windows in flight, not of all its windows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from captionflow.aio import in_daemon_thread
from captionflow.config import VideoSettings
from captionflow.errors import (
    CaptionflowError,
    ErrorCode,
    EventError,
    InternalError,
    InvalidRequestError,
    VideoTooManyWindowsError,
)
from captionflow.video.clip import Clip
from captionflow.video.decode import DecodeStats, decode_frames
from captionflow.video.demux import VideoIndex, probe
from captionflow.video.fetchers import LocalVideo, check_fetchers, fetch
from captionflow.video.pool import DecodePool
from captionflow.video.ranged import RemoteVideo
from captionflow.video.sampling import SamplingPolicy
from captionflow.video.validator import content_validator
from captionflow.video.windows import plan_windows


@dataclasses.dataclass(frozen=True, slots=True)
class _Plan:
    """One clip to cut: the policy restricted to it, its frames and output size."""

    policy: SamplingPolicy
    window_index: int | None
    indices: list[int]
    sample_fps: float
    height: int
    width: int


def _probe_kwargs(path: Any, settings: VideoSettings) -> dict[str, Any]:
    max_s, name = max_video_duration_s(settings)
    return {"path": path, "max_duration_s": max_s, "duration_setting": name,
            "max_source_pixels": settings.max_source_pixels,
            "max_source_frames": settings.max_source_frames,
            "max_probe_packets": settings.max_probe_packets}


def max_video_duration_s(settings: VideoSettings) -> tuple[float, str]:
    """The longest video an event may reference, and the setting that says so. With windows,
    ``video.max_duration_s`` bounds each window (the settings keep every window within it),
    so a video may be as long as ``video.max_windows`` windows cover."""
    if not settings.window_s:
        return settings.max_duration_s, "video.max_duration_s"
    stride_s = settings.window_s - settings.window_overlap_s
    covered_s = (settings.max_windows - 1) * stride_s + settings.window_s \
        + settings.window_min_remainder_s
    if covered_s <= settings.max_duration_s:
        return settings.max_duration_s, "video.max_duration_s"
    return covered_s, "video.max_windows x video.window_s"


def plan_clips(index: VideoIndex, policy: SamplingPolicy,
               settings: VideoSettings) -> list[_Plan]:
    """One plan, or one per window when ``settings.window_s`` is set (at most
    ``settings.max_windows``)."""
    facts = index.facts
    if not settings.window_s:
        return [_plan(index, policy, None)]
    start_s = policy.start_s or 0.0
    end_s = min(policy.end_s if policy.end_s is not None else facts.duration_s,
                facts.duration_s)
    if end_s <= start_s:
        raise InvalidRequestError(
            f"video range start_s={start_s} end_s={end_s} is empty for a "
            f"{facts.duration_s:.2f} s video")
    stride_s = settings.window_s - settings.window_overlap_s
    if (end_s - start_s - settings.window_s) / stride_s + 1 > settings.max_windows + 1:
        raise _too_many_windows(end_s - start_s, settings)  # before building the list
    windows = plan_windows(start_s, end_s, window_s=settings.window_s,
                           overlap_s=settings.window_overlap_s,
                           min_remainder_s=settings.window_min_remainder_s)
    if len(windows) > settings.max_windows:
        raise _too_many_windows(end_s - start_s, settings)
    return [_plan(index, dataclasses.replace(policy, start_s=w.start_s, end_s=w.end_s),
                  w.index) for w in windows]


def _too_many_windows(span_s: float, settings: VideoSettings) -> VideoTooManyWindowsError:
    return VideoTooManyWindowsError(
        f"{span_s:.0f} s cut into video.window_s={settings.window_s:g} s windows is more than "
        f"video.max_windows={settings.max_windows}; send a shorter range (start_s/end_s), "
        "use longer windows or raise the limit")


def _plan(index: VideoIndex, policy: SamplingPolicy, window_index: int | None) -> _Plan:
    facts = index.facts
    indices, sample_fps = policy.frame_indices(facts.total_frames, facts.source_fps)
    height, width = policy.frame_size(facts.height, facts.width, len(indices))
    if facts.total_frames < 2:
        # A still image repeated to the model's temporal factor: the sampling rate is the
        # policy's, the frame's own rate says nothing.
        sample_fps = policy.fps
    return _Plan(policy, window_index, indices, sample_fps, height, width)


def _decode_kwargs(path: Any, index: VideoIndex, plan: _Plan,
                   settings: VideoSettings) -> dict[str, Any]:
    return {"path": path, "index": index, "frame_indices": plan.indices,
            "height": plan.height, "width": plan.width, "threads": settings.decode_threads,
            "max_source_pixels": settings.max_source_pixels, "device": settings.decode_device}


def _clip(index: VideoIndex, plan: _Plan, frames: np.ndarray, stats: DecodeStats) -> Clip:
    facts = index.facts
    if stats.rotation_deg != facts.rotation_deg:
        facts = dataclasses.replace(facts, rotation_deg=stats.rotation_deg)
    policy = plan.policy
    return Clip(
        frames=frames,
        frame_indices=tuple(plan.indices),
        timestamps_s=tuple(index.timestamp_s(i) for i in plan.indices),
        sample_fps=round(plan.sample_fps, 6),
        facts=facts,
        start_s=policy.start_s or 0.0,
        end_s=policy.end_s if policy.end_s is not None else facts.duration_s,
        window_index=plan.window_index,
        extra={"seeks": stats.seeks, "packets_decoded": stats.packets_decoded,
               "frames_decoded": stats.frames_decoded, "decode_errors": stats.decode_errors,
               "linear_fallback": stats.linear_fallback, "decode_device": stats.device,
               "device_fallback": stats.device_fallback},
    )


def load_clips(reference: str, settings: VideoSettings,
               overrides: Mapping[str, Any] | None = None) -> list[Clip]:
    """Fetch ``reference`` and sample it in this process: one :class:`Clip`, or one per
    window when ``settings.window_s`` is set. Raises ``EventError`` subclasses."""
    policy = SamplingPolicy.from_settings(settings, overrides)
    started = time.monotonic()
    video = fetch(reference, settings)
    fetch_s = time.monotonic() - started
    try:
        fetched = _BytesRead(video.bytes_read)
        index = probe(**_probe_kwargs(video.source, settings))
        fetched.add(index.bytes_read)
        clips = []
        for plan in plan_clips(index, policy, settings):
            frames, stats = decode_frames(**_decode_kwargs(video.source, index, plan, settings))
            clips.append(fetched.tag(_clip(index, plan, frames, stats), stats))
    finally:
        video.release()
    for clip in clips:
        clip.extra["fetch_s"] = fetch_s  # the decode stage's metrics split fetch from decode
    return clips


class _BytesRead:
    """Bytes fetched over the network for one event so far: the fetch, the probe and every
    decode (each counted where it ran, child process or not). Every clip's
    ``extra["bytes_read"]`` is the running total, so the event's is its clips' maximum.
    Local files have none."""

    def __init__(self, fetched: int | None) -> None:
        self.total = fetched

    def add(self, n: int) -> None:
        if self.total is not None:
            self.total += n

    def tag(self, clip: Clip, stats: DecodeStats) -> Clip:
        self.add(stats.bytes_read)
        if self.total is not None:
            clip.extra["bytes_read"] = self.total
        return clip


class VideoClips:
    """One fetched and probed video (a :class:`captionflow.video.clip.ClipStream`): clip
    ``i`` is decoded in a decoder process when ``await clip(i)`` asks for it."""

    def __init__(self, pool: DecodePool, video: LocalVideo | RemoteVideo, index: VideoIndex,
                 plans: list[_Plan], settings: VideoSettings, fetch_s: float,
                 probe_s: float, fetched_bytes: int | None = None) -> None:
        self._pool = pool
        self._video = video
        self._index = index
        self._bytes = _BytesRead(fetched_bytes)
        self._bytes.add(index.bytes_read)
        self._plans = plans
        self._settings = settings
        self.fetch_s = fetch_s
        self.probe_s = probe_s
        self.decode_s = 0.0
        self._validator: str | None = None  # "" once known to have none
        self.validate_s = 0.0

    @property
    def count(self) -> int:
        return len(self._plans)

    @property
    def facts(self) -> Any:
        return self._index.facts

    @property
    def fetch_decode_s(self) -> float:
        return self.fetch_s + self.probe_s + self.decode_s

    async def clip(self, i: int) -> Clip:
        plan = self._plans[i]
        started = time.monotonic()
        try:
            frames, stats = await _guard(self._video.source.name, self._pool.decode(
                **_decode_kwargs(self._video.source, self._index, plan, self._settings)))
        finally:
            self.decode_s += time.monotonic() - started
        clip = self._bytes.tag(_clip(self._index, plan, frames, stats), stats)
        clip.extra["fetch_s"] = self.fetch_s
        clip.extra["decode_s"] = time.monotonic() - started
        return clip

    async def content_validator(self) -> str | None:
        """The video's validator (``captionflow.video.validator``), computed once, off the
        event loop: a local file is hashed whole."""
        if self._validator is None:
            started = time.monotonic()
            self._validator = await asyncio.to_thread(content_validator, self._video) or ""
            self.validate_s = time.monotonic() - started
        return self._validator or None

    def clip_identity(self, i: int) -> dict[str, Any]:
        """Clip ``i`` as planned: what decides its frames, known before decoding it."""
        plan, facts = self._plans[i], self._index.facts
        policy = plan.policy
        return {"start_s": policy.start_s or 0.0,
                "end_s": policy.end_s if policy.end_s is not None else facts.duration_s,
                "window": plan.window_index, "frames": plan.indices,
                "sample_fps": round(plan.sample_fps, 6), "size": [plan.height, plan.width],
                "device": self._settings.decode_device.split(":")[0]}

    def planned_clip(self, i: int) -> Clip:
        """Clip ``i`` as it would be decoded, without its pixels (frames as in
        :meth:`Clip.without_frames`): what a caption from the cache describes."""
        plan = self._plans[i]
        empty = np.lib.stride_tricks.as_strided(
            np.zeros(1, np.uint8), shape=(len(plan.indices), plan.height, plan.width, 3),
            strides=(0, 0, 0, 0), writeable=False)
        clip = self._bytes.tag(_clip(self._index, plan, empty, DecodeStats()), DecodeStats())
        clip.extra["fetch_s"] = self.fetch_s
        clip.extra["cached"] = True  # not decoded: no decode device, no decode stats
        for name in ("decode_device", "device_fallback", "seeks", "packets_decoded",
                     "frames_decoded", "decode_errors", "linear_fallback"):
            clip.extra.pop(name, None)
        return clip

    async def aclose(self) -> None:
        self._video.release()


class FrameSource:
    """Fetch in daemon threads, probe and decode in at most ``video.decode_workers``
    decoder processes (see the module docstring)."""

    def __init__(self, settings: VideoSettings) -> None:
        self._settings = settings
        self._pool = DecodePool(workers=settings.decode_workers,
                                memory_limit_bytes=settings.decode_memory_limit_bytes,
                                timeout_s=settings.decode_timeout_s,
                                device=settings.decode_device)
        # Downloads of this source go to a private directory, removed on close, so a
        # download abandoned at shutdown leaves nothing behind.
        base = settings.download_dir or Path(tempfile.gettempdir())
        base.mkdir(parents=True, exist_ok=True)
        self._download_dir = Path(tempfile.mkdtemp(prefix="captionflow-downloads-", dir=base))
        self._fetch_settings = settings.model_copy(update={"download_dir": self._download_dir})
        self._closed = False

    @property
    def pool(self) -> DecodePool:
        return self._pool

    async def start(self) -> None:
        """With a GPU ``video.decode_device``, start one decoder now so that a device that
        cannot be opened stops the run (``decode_device_unavailable``) before any record
        is taken; with the CPU, decoders start with the first record. Every allowed
        scheme's fetcher is imported now: a broken one is a ``ConfigError``."""
        check_fetchers(self._settings.allowed_schemes)
        if self._settings.decode_device != "cpu":
            await self._pool.start_one()

    async def open(self, reference: str,
                   overrides: Mapping[str, Any] | None = None) -> VideoClips:
        """Fetch and probe ``reference``; its clips are decoded one by one on demand.
        The caller must ``await aclose()`` the result."""
        if self._closed:
            raise InternalError("FrameSource.open() called after close()")
        settings = self._settings
        policy = SamplingPolicy.from_settings(settings, overrides)
        started = time.monotonic()
        video = await _guard(reference, in_daemon_thread(
            fetch, reference, self._fetch_settings, name="captionflow-fetch",
            release=_release_video))
        fetch_s = time.monotonic() - started
        fetched_bytes = video.bytes_read
        try:
            index = await _guard(reference, self._pool.probe(
                **_probe_kwargs(video.source, settings)))
            plans = plan_clips(index, policy, settings)
        except BaseException:
            video.release()
            raise
        return VideoClips(self._pool, video, index, plans, settings, fetch_s,
                          time.monotonic() - started - fetch_s, fetched_bytes)

    async def clips(self, reference: str,
                    overrides: Mapping[str, Any] | None = None) -> list[Clip]:
        """Every clip of ``reference`` at once (one window after another)."""
        stream = await self.open(reference, overrides)
        try:
            return [await stream.clip(i) for i in range(stream.count)]
        finally:
            await stream.aclose()

    async def close(self) -> None:
        """Kill the decoder processes (a stuck decode is not waited for) and drop the
        downloads; a fetch still running ends by its own deadline, unwaited."""
        if self._closed:
            return
        self._closed = True
        await self._pool.close()
        shutil.rmtree(self._download_dir, ignore_errors=True)

    async def __aenter__(self) -> FrameSource:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _guard(reference: str, work: Any) -> Any:
    try:
        return await work
    except CaptionflowError:
        raise
    except Exception as e:
        # A bug or an unforeseen library error fails this event, not the worker.
        raise EventError(f"decoding {reference!r} failed unexpectedly: {e!r}",
                         code=ErrorCode.INTERNAL) from e


def _release_video(video: object) -> None:
    # A fetch finished after its caller gave up: its temporary file is nobody's now.
    if isinstance(video, LocalVideo):
        video.release()
