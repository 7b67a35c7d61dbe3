"""s3:// references against a real S3-compatible server (moto_server on loopback).

Each test uploads real encoded videos and reads them back through the whole fetch/decode
path; faults are caused, not mocked: a missing key, a bucket policy that denies reads, an
object replaced mid-read, the server stopped.
"""

from __future__ import annotations

import io
import json
import pickle
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from captionflow.config import VideoSettings
from captionflow.errors import (
    CaptionflowError,
    Dependency,
    DependencyState,
    ErrorCode,
    ErrorKind,
    ObjectStoreUnavailableError,
    VideoForbiddenError,
    VideoNotFoundError,
)
from captionflow.video.decode import decode_frames
from captionflow.video.demux import probe
from captionflow.video.fetch import LocalVideo, fetch
from captionflow.video.ranged import ByteCounter, RangeCache, RangeReader, mp4_hollow_ranges
from captionflow.video.s3 import S3File, parse_s3_url, probe_object_store
from captionflow.video.source import FrameSource, load_clips
from tests.support.corpus import CorpusFile, read_index
from tests.support.s3_fixtures import MotoServer

# B-frames (reordered timestamps) in an MP4: the index-only probe must get them right.
CLIP = "h264_160x120_30fps.mp4"


def upload(server: MotoServer, bucket: str, key: str, path: str | Path) -> str:
    server.client().upload_file(str(path), bucket, key)
    return f"s3://{bucket}/{key}"


def ranged(server: MotoServer, **overrides: object) -> VideoSettings:
    """Every object read in ranges (none downloaded whole)."""
    return server.video_settings(s3_whole_object_max_bytes=0, **overrides)


def local_settings(path: str | Path, **overrides: object) -> VideoSettings:
    return VideoSettings(allowed_roots=(Path(path).parent,), **overrides)


# --- the reader on its own ---------------------------------------------------------------


def test_range_reader_reads_and_seeks_like_a_file() -> None:
    data = bytes(range(256)) * 4000
    calls: list[tuple[int, int]] = []

    def fetch_range(start: int, end: int) -> bytes:
        calls.append((start, end))
        return data[start:end]

    counter = ByteCounter()
    reader = RangeReader(fetch_range, len(data), name="x", cache=RangeCache(1 << 20),
                         counter=counter, min_fetch_bytes=1000, max_fetch_bytes=8000)
    buffered = io.BufferedReader(reader, buffer_size=512)
    assert buffered.read(10) == data[:10]
    buffered.seek(500_000)
    assert buffered.read(3000) == data[500_000:503_000]
    buffered.seek(-5, io.SEEK_END)
    assert buffered.read() == data[-5:]
    assert buffered.read() == b""
    reader.seek(0)
    whole = reader.read()
    assert whole == data
    assert counter.value == sum(e - s for s, e in calls)
    # Sequential reads grow the requests up to the cap; a seek starts small again.
    sizes = [e - s for s, e in calls]
    assert max(sizes) == 8000 and sizes[0] == 1000


def test_hollow_ranges_cover_the_mp4_payload_only(video_corpus: dict[str, CorpusFile]) -> None:
    mp4 = Path(video_corpus[CLIP].path).read_bytes()
    ranges = mp4_hollow_ranges(lambda pos, n: mp4[pos:pos + n], len(mp4))
    [(start, end)] = ranges
    assert mp4[start - 4:start] == b"mdat" and end - start > len(mp4) // 2
    webm = Path(video_corpus["vp9_odd_65x49_15fps.webm"].path).read_bytes()
    assert mp4_hollow_ranges(lambda pos, n: webm[pos:pos + n], len(webm)) == []


def test_parse_s3_url() -> None:
    assert parse_s3_url("s3://b-1/a/b c?.mp4") == ("b-1", "a/b c?.mp4")
    for bad in ("s3://", "s3://bucket", "s3://bucket/", "s3:///key"):
        with pytest.raises(CaptionflowError) as info:
            parse_s3_url(bad)
        assert info.value.code == ErrorCode.INVALID_REQUEST


# --- fetch and decode against the server ---------------------------------------------------


def test_small_object_is_downloaded_whole(s3_server: MotoServer, s3_bucket: str,
                                          video_corpus: dict[str, CorpusFile]) -> None:
    path = video_corpus[CLIP].path
    url = upload(s3_server, s3_bucket, "small/clip.mp4", path)
    settings = s3_server.video_settings()
    video = fetch(url, settings)
    assert isinstance(video, LocalVideo) and video.temporary
    assert video.bytes_read == video.size_bytes == Path(path).stat().st_size
    video.release()
    assert not video.path.exists()
    [clip] = load_clips(url, settings)
    [expected] = load_clips(path, local_settings(path))
    assert np.array_equal(clip.frames, expected.frames)
    assert clip.extra["bytes_read"] == Path(path).stat().st_size
    assert "bytes_read" not in expected.extra


@pytest.mark.parametrize("name", [CLIP, "hevc_128x96_24fps.mp4", "h264_vfr_96x64.mp4",
                                  "vp9_odd_65x49_15fps.webm", "av1_96x64_24fps.mkv"])
def test_ranged_decode_equals_the_local_decode(s3_server: MotoServer, s3_bucket: str,
                                               video_corpus: dict[str, CorpusFile],
                                               name: str) -> None:
    path = video_corpus[name].path
    url = upload(s3_server, s3_bucket, f"ranged/{name}", path)
    settings = ranged(s3_server, s3_min_read_bytes=4096)
    video = fetch(url, settings)
    assert isinstance(video, S3File)
    [clip] = load_clips(url, settings)
    [expected] = load_clips(path, local_settings(path))
    assert clip.frame_indices == expected.frame_indices
    assert clip.facts == expected.facts
    assert np.array_equal(clip.frames, expected.frames)
    assert [read_index(f) for f in clip.frames] == list(clip.frame_indices)
    assert 0 < clip.extra["bytes_read"]


async def test_ranged_decode_in_decoder_processes(s3_server: MotoServer, s3_bucket: str,
                                                  video_corpus: dict[str, CorpusFile]) -> None:
    """The worker's path: the S3File is pickled to decoder child processes, each opens
    its own client; their byte counts come back with the results."""
    path = video_corpus[CLIP].path
    url = upload(s3_server, s3_bucket, "pool/clip.mp4", path)
    settings = ranged(s3_server, s3_min_read_bytes=4096)
    copy = pickle.loads(pickle.dumps(fetch(url, settings)))
    assert isinstance(copy, S3File) and copy.bytes_read == 0
    async with FrameSource(settings) as source:
        [clip] = await source.clips(url)
    [expected] = load_clips(path, local_settings(path))
    assert np.array_equal(clip.frames, expected.frames)
    assert clip.extra["bytes_read"] > 0


def test_missing_key_and_bucket_are_not_found(s3_server: MotoServer, s3_bucket: str) -> None:
    settings = s3_server.video_settings()
    for url in (f"s3://{s3_bucket}/no/such.mp4", "s3://no-such-bucket-cf/a.mp4"):
        with pytest.raises(VideoNotFoundError) as info:
            fetch(url, settings)
        assert info.value.code == ErrorCode.VIDEO_NOT_FOUND and info.value.kind == ErrorKind.EVENT


def deny_reads(server: MotoServer, bucket: str) -> None:
    policy = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Deny", "Principal": "*", "Action": "s3:GetObject",
        "Resource": f"arn:aws:s3:::{bucket}/*"}]}
    server.client().put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))


@pytest.mark.parametrize("whole", [True, False])
def test_denied_bucket_is_forbidden(s3_server: MotoServer, video_corpus: dict[str, CorpusFile],
                                    whole: bool) -> None:
    bucket = s3_server.new_bucket("denied")
    url = upload(s3_server, bucket, "clip.mp4", video_corpus[CLIP].path)
    deny_reads(s3_server, bucket)
    settings = s3_server.video_settings() if whole else ranged(s3_server)
    with pytest.raises(VideoForbiddenError) as info:
        load_clips(url, settings)
    assert info.value.code == ErrorCode.VIDEO_FORBIDDEN and info.value.kind == ErrorKind.EVENT


def test_limits_and_allowed_schemes(s3_server: MotoServer, s3_bucket: str,
                                    video_corpus: dict[str, CorpusFile]) -> None:
    url = upload(s3_server, s3_bucket, "limits/clip.mp4", video_corpus[CLIP].path)
    with pytest.raises(CaptionflowError) as info:
        fetch(url, s3_server.video_settings(max_video_bytes=1000))
    assert info.value.code == ErrorCode.VIDEO_TOO_LARGE
    with pytest.raises(CaptionflowError) as info:
        fetch(url, s3_server.video_settings(allowed_schemes=("file", "https")))
    assert info.value.code == ErrorCode.VIDEO_FORBIDDEN


def test_object_replaced_mid_read_fails_the_read(s3_server: MotoServer, s3_bucket: str,
                                                 video_corpus: dict[str, CorpusFile]) -> None:
    url = upload(s3_server, s3_bucket, "replaced.mp4", video_corpus[CLIP].path)
    video = fetch(url, ranged(s3_server))
    assert isinstance(video, S3File)
    upload(s3_server, s3_bucket, "replaced.mp4", video_corpus["hevc_128x96_24fps.mp4"].path)
    with pytest.raises(CaptionflowError) as info:
        video.fetch(0, 100)
    assert info.value.code == ErrorCode.FETCH_FAILED and info.value.retriable


class FailingStore:
    """A loopback HTTP server answering every S3 request with one error, as a failing or
    refusing store does: HEAD with the bare status, GET with S3's XML error body."""

    def __init__(self, status: int, code: str, *, stall_s: float = 0.0) -> None:
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, body: bool) -> None:
                outer.requests.append(self.command)
                time.sleep(stall_s)
                payload = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                           f"<Message>{code} from the test store</Message></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload) if body else 0))
                self.end_headers()
                if body:
                    self.wfile.write(payload)

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True  # a stalled answer is not waited for at close
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize(("status", "code", "expected"), [
    (503, "SlowDown", ErrorCode.STORE_UNAVAILABLE),
    (500, "InternalError", ErrorCode.STORE_UNAVAILABLE),
    (403, "InvalidAccessKeyId", ErrorCode.STORE_UNAVAILABLE),
    (403, "SignatureDoesNotMatch", ErrorCode.STORE_UNAVAILABLE),
    (403, "AccessDenied", ErrorCode.VIDEO_FORBIDDEN),
    (404, "NoSuchKey", ErrorCode.VIDEO_NOT_FOUND),
])
def test_store_answers_map_to_codes(s3_env: None, status: int, code: str,
                                    expected: ErrorCode) -> None:
    store = FailingStore(status, code)
    try:
        settings = VideoSettings(allowed_schemes=("s3",), s3_endpoint_url=store.endpoint_url,
                                 s3_addressing_style="path", s3_max_attempts=2)
        with pytest.raises(CaptionflowError) as info:
            fetch("s3://bucket/key.mp4", settings)
        assert info.value.code == expected, info.value
        outage = expected == ErrorCode.STORE_UNAVAILABLE
        assert info.value.kind == (ErrorKind.DEPENDENCY if outage else ErrorKind.EVENT)
        if status >= 500:  # throttling and failures were retried before giving up
            assert store.requests == ["HEAD", "HEAD"]
        if status == 403:  # a bare 403 on HEAD is explained by a one-byte GET
            assert store.requests[-1] == "GET"
    finally:
        store.close()


@pytest.mark.parametrize(("status", "code", "state"), [
    (403, "InvalidAccessKeyId", DependencyState.MISCONFIGURED),
    (403, "ExpiredToken", DependencyState.MISCONFIGURED),
    (503, "SlowDown", DependencyState.OVERLOADED),
    (500, "InternalError", DependencyState.DOWN),
    (403, "AccessDenied", DependencyState.UP),  # valid keys without s3:ListAllMyBuckets
])
async def test_the_store_probe_says_what_the_store_said(s3_env: None, status: int, code: str,
                                                        state: DependencyState) -> None:
    """A probe that got a credential refusal is not "up": the gate must not charge a record
    for a store that refuses every request alike."""
    store = FailingStore(status, code)
    try:
        settings = VideoSettings(allowed_schemes=("s3",), s3_endpoint_url=store.endpoint_url,
                                 s3_addressing_style="path", s3_max_attempts=1)
        assert await probe_object_store(settings, timeout_s=3.0) is state
    finally:
        store.close()


def test_a_store_that_does_not_answer_in_time_is_unavailable(s3_env: None) -> None:
    store = FailingStore(500, "InternalError", stall_s=3.0)
    try:
        settings = VideoSettings(allowed_schemes=("s3",), s3_endpoint_url=store.endpoint_url,
                                 s3_addressing_style="path", s3_max_attempts=1,
                                 fetch_read_timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(ObjectStoreUnavailableError):
            fetch("s3://bucket/key.mp4", settings)
        assert time.monotonic() - started < 2.5
    finally:
        store.close()


def test_ranged_reads_keep_the_total_deadline(s3_server: MotoServer, s3_bucket: str,
                                              video_corpus: dict[str, CorpusFile]) -> None:
    url = upload(s3_server, s3_bucket, "deadline.mp4", video_corpus[CLIP].path)
    video = fetch(url, ranged(s3_server, fetch_total_timeout_s=1e-6, s3_min_read_bytes=1024))
    assert isinstance(video, S3File)
    with pytest.raises(CaptionflowError) as info:
        load_clips_of(video)
    assert info.value.code == ErrorCode.FETCH_TIMEOUT and info.value.retriable


def load_clips_of(video: S3File) -> None:
    index = probe(video, max_duration_s=3600)
    decode_frames(video, index, list(range(index.facts.total_frames)), height=28, width=28)


# --- the store down -------------------------------------------------------------------------


async def test_store_down_is_a_dependency_error_and_the_probe_sees_it(
        tmp_path: Path, s3_env: None, video_corpus: dict[str, CorpusFile]) -> None:
    server = MotoServer(tmp_path / "moto.log").start()
    try:
        bucket = server.new_bucket()
        url = upload(server, bucket, "clip.mp4", video_corpus[CLIP].path)
        settings = ranged(server, s3_max_attempts=2, fetch_connect_timeout_s=1.0)
        assert await probe_object_store(settings, timeout_s=3.0) is DependencyState.UP
        video = fetch(url, settings)  # found and probed while the store was up
        assert isinstance(video, S3File)
        index = probe(video, max_duration_s=3600)
        server.stop()
        assert await probe_object_store(settings, timeout_s=3.0) is DependencyState.DOWN
        # Mid-stream: the decoder's ranged reads (through PyAV's read callback) fail as an
        # outage, not as a bad video.
        with pytest.raises(ObjectStoreUnavailableError) as info:
            decode_frames(video, index, [0, 1], height=28, width=28)
        assert info.value.kind == ErrorKind.DEPENDENCY
        assert info.value.code == ErrorCode.STORE_UNAVAILABLE
        assert info.value.dependency == Dependency.OBJECT_STORE
        # A new event while it is down: the lookup fails the same way.
        for reference_settings in (settings, server.video_settings()):
            with pytest.raises(ObjectStoreUnavailableError):
                fetch(url, reference_settings)
        server.start()
        assert await probe_object_store(settings, timeout_s=3.0) is DependencyState.UP
    finally:
        server.stop()


# --- range reads on a long video ------------------------------------------------------------


@pytest.mark.slow
def test_sparse_sampling_reads_a_fraction_of_a_long_object(
        s3_server: MotoServer, s3_bucket: str, long_1080p_clip: Path) -> None:
    """0.1 fps of a 120 s 1080p object, decoded from ranged GETs: the same frames as the
    local decode, for a fraction of the object's bytes (LONG_CLIP's parameters matter: the
    share is the packets from each sampled frame's keyframe to it, docs/storage.md)."""
    size = long_1080p_clip.stat().st_size
    url = upload(s3_server, s3_bucket, "long/clip.mp4", long_1080p_clip)
    settings = ranged(s3_server, fps=0.1, max_pixels=448 * 252)
    [clip] = load_clips(url, settings)
    [expected] = load_clips(str(long_1080p_clip), local_settings(long_1080p_clip, fps=0.1,
                                                            max_pixels=448 * 252))
    assert clip.num_frames == 12 and clip.frame_indices == expected.frame_indices
    assert np.array_equal(clip.frames, expected.frames)
    share = clip.extra["bytes_read"] / size
    print(f"0.1 fps of {size} bytes: read {clip.extra['bytes_read']} ({share:.1%}), "
          f"{clip.extra['seeks']} seeks")
    assert share < 0.40
    # A 10 s window (frames 1440-1680) reads from the keyframe before it (frame 1250): 15%
    # of the packets, plus the index and the read-ahead's last request.
    [window] = load_clips(url, settings, {"start_s": 60.0, "end_s": 70.0, "fps": 1.0})
    [window_local] = load_clips(str(long_1080p_clip), local_settings(
        long_1080p_clip, max_pixels=448 * 252), {"start_s": 60.0, "end_s": 70.0, "fps": 1.0})
    assert np.array_equal(window.frames, window_local.frames)
    window_share = window.extra["bytes_read"] / size
    print(f"10 s window: read {window.extra['bytes_read']} ({window_share:.1%})")
    assert window_share < 0.25
