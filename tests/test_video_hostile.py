"""Hostile media and sources: decoder crashes, budgets, long videos, trickling servers, SSRF.

Everything here is caused for real: real encoded files (PyAV), real decoder processes that
get SIGKILLed, a real loopback HTTP server that trickles bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import os
import signal
import socket
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest

from captionflow.captioning import Attempts, caption_event
from captionflow.config import Settings, VideoSettings, WorkerSettings
from captionflow.errors import CaptionflowError, ErrorCode, InvalidRequestError
from captionflow.schemas.events import VideoEvent
from captionflow.serving.base import CaptionRequest, CaptionResult
from captionflow.video.fetch import check_address, embedded_ipv4, fetch
from captionflow.video.source import FrameSource, load_clips
from tests.support.corpus import X264, CorpusFile, _encode, read_index
from tests.support.model_fixtures import synthetic_clip
from tests.support.video_fixtures import LoopbackServer

MB = 1 << 20


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def busy_clip(hostile_dir: Path) -> Path:
    """240 frames of 640x480: decoding all of them on one thread takes a second or more."""
    path = hostile_dir / "busy_640x480.mp4"
    _encode(path, "libx264", width=640, height=480, fps=30, frames=240, gop=30, options=X264)
    return path


@pytest.fixture(scope="module")
def clip_8k(hostile_dir: Path) -> Path:
    """Two frames of 7680x4320 (160 kB on disk: flat blocks compress well)."""
    path = hostile_dir / "uhd8k_7680x4320.mp4"
    _encode(path, "libx264", width=7680, height=4320, fps=2, frames=2, options=X264)
    return path


@pytest.fixture(scope="module")
def long_clip(hostile_dir: Path) -> Path:
    """600 s at 1 fps, 128x96: a ten-minute video that encodes in a fraction of a second."""
    path = hostile_dir / "long_600s_128x96_1fps.mp4"
    _encode(path, "libx264", width=128, height=96, fps=1, frames=600, gop=10, options=X264)
    return path


def settings_for(root: Path, **kw: object) -> VideoSettings:
    values: dict[str, object] = {"allowed_roots": (root,), "min_pixels": 4 * 784,
                                 "max_pixels": 64 * 784, **kw}
    return VideoSettings(**values)  # type: ignore[arg-type]


def vm_hwm_bytes(pid: int) -> int:
    """Peak resident set of a live process (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --- decoder crash ------------------------------------------------------------------------


async def test_sigkilled_decoder_fails_its_event_and_the_source_goes_on(
        busy_clip: Path, video_corpus: dict[str, CorpusFile], video_corpus_dir: Path) -> None:
    settings = settings_for(busy_clip.parent, decode_threads=1, decode_workers=1, fps=30.0,
                            max_pixels=256 * 784)
    async with FrameSource(settings) as source:
        victim = asyncio.create_task(source.clips(str(busy_clip)))
        started = time.monotonic()
        while not source.pool.busy_pids("decode"):
            assert time.monotonic() - started < 30, "the decode never started"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # well inside a decode that takes over a second
        [pid] = source.pool.busy_pids("decode")
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(CaptionflowError) as info:
            await victim
        assert info.value.code == ErrorCode.DECODE_CRASHED
        assert "SIGKILL" in info.value.message and not info.value.retriable
        # The same source serves the next events, from a replacement process.
        allowed = settings.model_copy(update={"allowed_roots": (video_corpus_dir,)})
        async with FrameSource(allowed) as other:
            file = video_corpus["h264_160x120_30fps.mp4"]
            [clip] = await other.clips(file.path)
            assert [read_index(f) for f in clip.frames] == list(clip.frame_indices)
        [clip] = await source.clips(str(busy_clip), {"nframes": 8})
        assert [read_index(f) for f in clip.frames] == list(clip.frame_indices)
        assert source.pool.started == 2
        assert pid not in source.pool.pids()


async def test_close_kills_a_stuck_decode_at_once(busy_clip: Path) -> None:
    settings = settings_for(busy_clip.parent, decode_threads=1, fps=30.0, max_pixels=256 * 784)
    source = FrameSource(settings)
    victim = asyncio.create_task(source.clips(str(busy_clip)))
    while not source.pool.busy_pids("decode"):
        await asyncio.sleep(0.01)
    [pid] = source.pool.busy_pids("decode")
    started = time.monotonic()
    await source.close()
    assert time.monotonic() - started < 2.0
    # Abandoned, not failed: no error code blames the video for the shutdown.
    with pytest.raises(asyncio.CancelledError):
        await victim
    assert not Path(f"/proc/{pid}").exists()  # killed and reaped


async def test_decode_past_its_deadline_is_killed(busy_clip: Path) -> None:
    settings = settings_for(busy_clip.parent, decode_threads=1, fps=30.0, max_pixels=256 * 784,
                            decode_timeout_s=0.3)
    async with FrameSource(settings) as source:
        started = time.monotonic()
        with pytest.raises(CaptionflowError) as info:
            await source.clips(str(busy_clip))
        assert info.value.code == ErrorCode.DECODE_TIMEOUT
        assert time.monotonic() - started < 5.0
        [clip] = await source.clips(str(busy_clip), {"nframes": 2})  # a quick one still works
        assert clip.num_frames == 2


async def test_memory_limit_fails_the_event_not_the_worker(
        clip_8k: Path) -> None:
    # 450 MB of address space: the interpreter and PyAV take ~400 MB, 8K frames do not fit
    # (at 500 MB an 8K decode fitted in 1 of 5 runs here).
    settings = settings_for(clip_8k.parent, decode_memory_limit_bytes=450 * MB,
                            decode_threads=2)
    async with FrameSource(settings) as source:
        with pytest.raises(CaptionflowError) as info:
            await source.clips(str(clip_8k))
        assert info.value.code == ErrorCode.DECODE_OUT_OF_MEMORY, info.value
    roomy = settings_for(clip_8k.parent, decode_memory_limit_bytes=2048 * MB, decode_threads=2)
    async with FrameSource(roomy) as source:
        [clip] = await source.clips(str(clip_8k))
        assert clip.num_frames == 2


# --- budgets --------------------------------------------------------------------------------


PEAK_RSS_BOUND = 400 * MB  # the interpreter with PyAV is ~300 MB; one 8K frame alone is 50 MB


async def test_8k_source_over_the_pixel_budget_is_refused_before_decoding(
        clip_8k: Path) -> None:
    settings = settings_for(clip_8k.parent, max_source_pixels=3840 * 2160, decode_workers=1)
    async with FrameSource(settings) as source:
        with pytest.raises(CaptionflowError) as info:
            await source.clips(str(clip_8k))
        assert info.value.code == ErrorCode.VIDEO_RESOLUTION_TOO_LARGE
        assert "7680x4320 (stream header)" in info.value.message
        [pid] = source.pool.pids()  # the child survived its refusal
        print(f"8K refusal: decoder peak RSS {vm_hwm_bytes(pid) / MB:.0f} MiB")
        assert vm_hwm_bytes(pid) < PEAK_RSS_BOUND
    # The same file within the budget decodes: the limit, not the file, refused it.
    settings = settings_for(clip_8k.parent, decode_workers=1)
    async with FrameSource(settings) as source:
        [clip] = await source.clips(str(clip_8k))
        assert clip.facts.width == 7680 and clip.num_frames == 2


@pytest.mark.parametrize(("limits", "code"), [
    ({"max_source_frames": 100}, ErrorCode.VIDEO_TOO_MANY_FRAMES),
    ({"max_probe_packets": 100}, ErrorCode.VIDEO_TOO_MANY_FRAMES),
    ({"max_duration_s": 100.0}, ErrorCode.VIDEO_TOO_LONG),
    ({"window_s": 1.0, "max_windows": 100}, ErrorCode.VIDEO_TOO_MANY_WINDOWS),
])
def test_budgets_have_their_own_codes(long_clip: Path, limits: dict, code: ErrorCode) -> None:
    with pytest.raises(CaptionflowError) as info:
        load_clips(str(long_clip), settings_for(long_clip.parent, **limits))
    assert info.value.code == code and not info.value.retriable


def test_packet_budget_holds_while_demuxing_when_the_header_says_nothing(
        hostile_dir: Path) -> None:
    # Raw H.264 (Annex B) has no container header: no frame count, no duration.
    path = hostile_dir / "raw.h264"
    _encode(path, "libx264", width=64, height=48, fps=25, frames=300, options=X264,
            fmt="h264")
    with pytest.raises(CaptionflowError) as info:
        load_clips(str(path), settings_for(hostile_dir, max_probe_packets=120))
    assert info.value.code == ErrorCode.VIDEO_TOO_MANY_FRAMES
    assert "over 120 packets" in info.value.message


# --- long video, windows decoded on demand --------------------------------------------------


@pytest.mark.slow
async def test_long_video_windows_keep_memory_at_the_window_budget(long_clip: Path) -> None:
    # Frames upscaled to ~720p so a window's frames weigh something: 10 frames x 2.6 MB.
    frame_px = 1288 * 700
    video = settings_for(long_clip.parent, window_s=10.0, min_pixels=frame_px,
                         max_pixels=frame_px + 28 * 28 * 40, windows_in_flight=2)
    settings = Settings(video=video, worker=WorkerSettings(max_attempts=1))
    event = VideoEvent.model_validate({"id": "long", "video": [str(long_clip)]})
    seen: list[int] = []
    peak = 0

    async def caption(request: CaptionRequest) -> CaptionResult:
        nonlocal peak
        frames = request.clip.frames
        assert float(frames.mean()) > 0  # touch every page, as a model would
        seen.append(request.clip.window_index or 0)
        peak = max(peak, rss_bytes())
        await asyncio.sleep(0.01)
        return CaptionResult(request.request_id, "ok", "stop", 1, 1)

    window_bytes = 0
    async with FrameSource(video) as source:
        [first] = await source.clips(str(long_clip), {"end_s": 10.0})
        window_bytes = first.frames.nbytes
        del first
        baseline = rss_bytes()
        result = await caption_event(event, clips=source.open, caption=caption,
                                     settings=settings, attempts=Attempts(settings.worker))
    assert sorted(seen) == list(range(60)) and len(result.clips) == 60
    assert result.text.count("\n") == 59
    all_windows = 60 * window_bytes  # what decoding every window up front would hold
    assert all_windows > 1000 * MB
    bound = baseline + 4 * window_bytes + 64 * MB  # two in flight, their copies, slack
    print(f"600 s, 60 windows: peak RSS {(peak - baseline) / MB:.0f} MiB over baseline; one "
          f"window {window_bytes / MB:.0f} MiB, all windows {all_windows / MB:.0f} MiB")
    assert peak < bound, (peak - baseline) / MB


async def test_a_failed_window_cancels_its_siblings() -> None:
    settings = Settings(video=VideoSettings(windows_in_flight=4),
                        worker=WorkerSettings(max_attempts=1))
    event = VideoEvent.model_validate({"id": "w", "video": ["x.mp4"]})
    cancelled: list[int] = []

    async def clips(reference: str, overrides: dict) -> list:
        return [dataclasses.replace(synthetic_clip(i), window_index=i) for i in range(4)]

    async def caption(request: CaptionRequest) -> CaptionResult:
        i = request.clip.window_index
        if i == 1:
            await asyncio.sleep(0.05)
            raise InvalidRequestError("window 1 cannot be captioned")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(i)
            raise
        return CaptionResult(request.request_id, "late", "stop", 1, 1)

    started = time.monotonic()
    with pytest.raises(CaptionflowError) as info:
        await caption_event(event, clips=clips, caption=caption, settings=settings,
                            attempts=Attempts(settings.worker))
    assert info.value.code == ErrorCode.INVALID_REQUEST
    assert sorted(cancelled) == [0, 2, 3]
    assert time.monotonic() - started < 5


# --- deadlines ------------------------------------------------------------------------------


def trickle(h: BaseHTTPRequestHandler, *, every_s: float, headers_too: bool) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
    if not headers_too:
        h.wfile.write(head)
        head = b""
    for byte in head + b"x" * 100_000:
        h.wfile.write(bytes([byte]) if isinstance(byte, int) else byte)
        h.wfile.flush()
        time.sleep(every_s)


@pytest.fixture
def trickler(http_server: LoopbackServer) -> Iterator[LoopbackServer]:
    http_server.routes["/body"] = lambda h: trickle(h, every_s=0.5, headers_too=False)
    http_server.routes["/head"] = lambda h: trickle(h, every_s=0.5, headers_too=True)
    yield http_server


# Every byte arrives well within the read timeout; only the total deadline can end it.
TOTAL_S = 2.5


def deadline_settings(tmp_path: Path) -> VideoSettings:
    return VideoSettings(fetch_allowed_networks=("127.0.0.1/32",), download_dir=tmp_path,
                         fetch_total_timeout_s=TOTAL_S, fetch_read_timeout_s=30.0)


@pytest.mark.slow
async def test_trickling_body_ends_at_the_total_deadline(trickler: LoopbackServer,
                                                         tmp_path: Path) -> None:
    async with FrameSource(deadline_settings(tmp_path)) as source:
        started = time.monotonic()
        with pytest.raises(CaptionflowError) as info:
            await source.clips(trickler.url("/body"))
        elapsed = time.monotonic() - started
    assert info.value.code == ErrorCode.FETCH_TIMEOUT and info.value.retriable
    assert "fetch_total_timeout_s" in info.value.message
    assert TOTAL_S - 0.1 < elapsed < TOTAL_S + 2.0
    assert list(tmp_path.iterdir()) == []  # nothing left in the download directory


@pytest.mark.slow
def test_trickling_headers_end_at_the_total_deadline(trickler: LoopbackServer,
                                                     tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(CaptionflowError) as info:
        fetch(trickler.url("/head"), deadline_settings(tmp_path))
    assert info.value.code == ErrorCode.FETCH_TIMEOUT
    assert TOTAL_S - 0.1 < time.monotonic() - started < TOTAL_S + 2.0


async def test_close_does_not_wait_for_a_stuck_fetch(http_server: LoopbackServer,
                                                     tmp_path: Path) -> None:
    http_server.stall("/stuck", 60.0)
    settings = VideoSettings(fetch_allowed_networks=("127.0.0.1/32",), download_dir=tmp_path)
    source = FrameSource(settings)
    fetching = asyncio.create_task(source.clips(http_server.url("/stuck")))
    await asyncio.sleep(0.3)
    started = time.monotonic()
    fetching.cancel()
    await source.close()
    assert time.monotonic() - started < 1.0
    with pytest.raises(asyncio.CancelledError):
        await fetching
    assert list(tmp_path.iterdir()) == []


# --- SSRF: IPv6 forms that embed an IPv4 address --------------------------------------------


BLOCKED_V4 = ["127.0.0.1", "10.1.2.3", "172.16.5.4", "192.168.1.1", "169.254.169.254",
              "100.64.0.1", "0.0.0.0"]


def embeddings(v4: str) -> dict[str, str]:
    n = int(ipaddress.IPv4Address(v4))
    hi, lo = n >> 16, n & 0xFFFF
    return {
        "ipv4-mapped": f"::ffff:{v4}",
        "ipv4-compatible": f"::{v4}",
        "ipv4-translated": f"::ffff:0:{v4}",
        "nat64": f"64:ff9b::{v4}",
        "nat64-local": f"64:ff9b:1::{hi:x}:{lo:x}",
        "6to4": f"2002:{hi:x}:{lo:x}::1",
        "teredo-server": f"2001:0:{hi:x}:{lo:x}::1",
        # Teredo stores the client address inverted in the last 32 bits.
        "teredo-client": f"2001:0:4136:e378:8000:63bf:{hi ^ 0xFFFF:x}:{lo ^ 0xFFFF:x}",
    }


@pytest.mark.parametrize("v4", BLOCKED_V4)
@pytest.mark.parametrize("form", list(embeddings("1.2.3.4")))
def test_every_ipv6_embedding_of_a_blocked_ipv4_is_refused(v4: str, form: str) -> None:
    ip = ipaddress.IPv6Address(embeddings(v4)[form])
    if form != "nat64-local":
        assert ipaddress.IPv4Address(v4) in embedded_ipv4(ip)
    with pytest.raises(CaptionflowError) as info:
        check_address(ip, VideoSettings())
    assert info.value.code == ErrorCode.VIDEO_FORBIDDEN


@pytest.mark.parametrize("form", ["ipv4-mapped", "nat64", "6to4"])
def test_embeddings_of_a_public_ipv4_pass(form: str) -> None:
    check_address(ipaddress.IPv6Address(embeddings("8.8.8.8")[form]), VideoSettings())


@pytest.mark.parametrize("form", ["ipv4-compatible", "nat64", "6to4", "ipv4-mapped"])
def test_a_url_with_an_embedded_loopback_is_refused_before_connecting(
        form: str, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://[{embeddings('127.0.0.1')[form]}]:{port}/v.mp4"
    with pytest.raises(CaptionflowError) as info:
        fetch(url, VideoSettings(download_dir=tmp_path))
    assert info.value.code == ErrorCode.VIDEO_FORBIDDEN


def test_shared_memory_frames_are_the_decoded_frames(
        video_corpus: dict[str, CorpusFile], video_corpus_dir: Path) -> None:
    file = video_corpus["h264_gop10_128x96_25fps_10s.mp4"]
    settings = settings_for(video_corpus_dir)
    [local] = load_clips(file.path, settings)

    async def via_pool() -> np.ndarray:
        async with FrameSource(settings) as source:
            [clip] = await source.clips(file.path)
            return clip.frames

    frames = asyncio.run(via_pool())
    assert np.array_equal(frames, local.frames)
    frames[0, 0, 0, 0] ^= 1  # writable, like an array the decoder made in this process


def test_the_decoder_pool_works_under_uvloop(tmp_path: Path) -> None:
    """uvloop (Ray's workers, uvicorn) leaves a watched descriptor non-blocking; every decode
    after the first then read as a dead decoder (decode_crashed) until the pool reset it."""
    import uvloop

    from captionflow.samples import make_sample_videos

    make_sample_videos(tmp_path)
    videos = sorted(tmp_path.glob("*.mp4"))[:3]

    async def decode_all() -> list[int]:
        async with FrameSource(VideoSettings(allowed_roots=(tmp_path,), decode_workers=1,
                                             max_frames=4)) as source:
            return [(await source.clips(str(v)))[0].num_frames for v in videos]

    assert uvloop.run(decode_all()) == [4, 4, 4]
