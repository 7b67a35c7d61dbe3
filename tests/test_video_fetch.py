"""Resolving references: allowed roots, file://, and http(s) against a real local server."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from captionflow.config import VideoSettings
from captionflow.errors import CaptionflowError, ErrorCode
from captionflow.video.fetch import LocalVideo, fetch, register_fetcher
from captionflow.video.source import load_clips
from tests.support.corpus import CorpusFile, read_index
from tests.support.video_fixtures import LoopbackServer

CLIP = "h264_160x120_30fps.mp4"
# Hang guard only: the slow server stalls far longer than this.
BOUND_S = 10.0


def code_of(reference: str, settings: VideoSettings) -> ErrorCode:
    started = time.monotonic()
    with pytest.raises(CaptionflowError) as info:
        fetch(reference, settings).release()
    assert time.monotonic() - started < BOUND_S
    return info.value.code


@pytest.fixture
def root(tmp_path: Path, video_corpus: dict[str, CorpusFile]) -> Path:
    root = tmp_path / "videos"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "clip.mp4").write_bytes(Path(video_corpus[CLIP].path).read_bytes())
    (tmp_path / "secret.mp4").write_bytes(b"outside")
    (root / "escape.mp4").symlink_to(tmp_path / "secret.mp4")
    (root / "inside-link.mp4").symlink_to(root / "sub" / "clip.mp4")
    return root


def test_local_paths_resolve_under_allowed_roots(root: Path) -> None:
    settings = VideoSettings(allowed_roots=(root,))
    assert fetch("sub/clip.mp4", settings).path == root / "sub" / "clip.mp4"
    assert fetch(str(root / "sub" / "clip.mp4"), settings).path == root / "sub" / "clip.mp4"
    assert fetch(f"file://{root}/sub/clip.mp4", settings).size_bytes > 0
    assert fetch("inside-link.mp4", settings).path == root / "sub" / "clip.mp4"
    assert not fetch("sub/clip.mp4", settings).temporary


def test_empty_roots_mean_the_working_directory(root: Path, monkeypatch) -> None:
    monkeypatch.chdir(root)
    assert fetch("sub/clip.mp4", VideoSettings()).path == root / "sub" / "clip.mp4"
    assert code_of(str(root.parent / "secret.mp4"), VideoSettings()) == \
        ErrorCode.VIDEO_FORBIDDEN


@pytest.mark.parametrize(("reference", "code"), [
    ("../secret.mp4", ErrorCode.VIDEO_FORBIDDEN),
    ("sub/../../secret.mp4", ErrorCode.VIDEO_FORBIDDEN),
    ("escape.mp4", ErrorCode.VIDEO_FORBIDDEN),
    ("/etc/passwd", ErrorCode.VIDEO_FORBIDDEN),
    ("file:///etc/passwd", ErrorCode.VIDEO_FORBIDDEN),
    ("file://otherhost/x.mp4", ErrorCode.VIDEO_FORBIDDEN),
    ("missing.mp4", ErrorCode.VIDEO_NOT_FOUND),
    ("sub", ErrorCode.VIDEO_NOT_FOUND),
    ("ftp://example.com/a.mp4", ErrorCode.VIDEO_FORBIDDEN),
    ("", ErrorCode.INVALID_REQUEST),
])
def test_bad_local_references(root: Path, reference: str, code: ErrorCode) -> None:
    assert code_of(reference, VideoSettings(allowed_roots=(root,))) == code


def test_local_size_limit_and_scheme_switch(root: Path) -> None:
    assert code_of("sub/clip.mp4", VideoSettings(allowed_roots=(root,), max_video_bytes=100)) \
        == ErrorCode.VIDEO_TOO_LARGE
    assert code_of("sub/clip.mp4", VideoSettings(allowed_roots=(root,),
                                                 allowed_schemes=("https",))) \
        == ErrorCode.VIDEO_FORBIDDEN


def test_object_store_plug_in(root: Path) -> None:
    seen = []

    def fake_store(reference: str, settings: VideoSettings, download_dir: Path) -> LocalVideo:
        seen.append(reference)
        return LocalVideo(path=root / "sub" / "clip.mp4", size_bytes=1)

    register_fetcher("teststore", fake_store)
    settings = VideoSettings(allowed_roots=(root,),
                             allowed_schemes=("file", "http", "https", "teststore"))
    assert fetch("teststore://bucket/key.mp4", settings).path.name == "clip.mp4"
    assert seen == ["teststore://bucket/key.mp4"]
    assert code_of("teststore://bucket/key.mp4", VideoSettings()) == ErrorCode.VIDEO_FORBIDDEN
    assert code_of("nostore://bucket/key.mp4", VideoSettings(allowed_schemes=("nostore",))) == \
        ErrorCode.INVALID_REQUEST


# --- http -----------------------------------------------------------------------------------


def loopback(tmp_path: Path, **kw: object) -> VideoSettings:
    return VideoSettings(fetch_allowed_networks=("127.0.0.1/32",), download_dir=tmp_path,
                         min_pixels=4 * 784, max_pixels=64 * 784, **kw)  # type: ignore[arg-type]


def test_http_download_through_a_redirect_decodes(
        http_server: LoopbackServer, video_corpus: dict[str, CorpusFile], tmp_path: Path) -> None:
    http_server.serve_file("/v.mp4", Path(video_corpus[CLIP].path))
    http_server.redirect("/go", "/v.mp4")
    [clip] = load_clips(http_server.url("/go"), loopback(tmp_path))
    assert [read_index(f) for f in clip.frames] == list(clip.frame_indices)
    assert clip.facts.size_bytes == Path(video_corpus[CLIP].path).stat().st_size
    assert list(tmp_path.iterdir()) == []  # the download is deleted after decoding


def test_loopback_is_refused_unless_allowed(
        http_server: LoopbackServer, video_corpus: dict[str, CorpusFile], tmp_path: Path) -> None:
    http_server.serve_file("/v.mp4", Path(video_corpus[CLIP].path))
    assert code_of(http_server.url("/v.mp4"), VideoSettings()) == ErrorCode.VIDEO_FORBIDDEN
    assert code_of(http_server.url("/v.mp4", host="localhost"), VideoSettings()) == \
        ErrorCode.VIDEO_FORBIDDEN


@pytest.mark.parametrize("target", [
    "http://127.0.0.2:{port}/v.mp4",        # loopback outside the allowed /32
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata service
    "http://10.1.2.3/v.mp4",                 # private
    "http://[::1]:{port}/v.mp4",             # IPv6 loopback
    "http://metadata.google.internal/x",
    "file:///etc/passwd",
])
def test_redirect_to_a_blocked_address_is_refused(
        http_server: LoopbackServer, target: str, tmp_path: Path) -> None:
    http_server.redirect("/hop", target.format(port=http_server.port))
    assert code_of(http_server.url("/hop"), loopback(tmp_path)) == ErrorCode.VIDEO_FORBIDDEN


@pytest.mark.parametrize("declare_length", [True, False])
def test_too_large_body_is_cut_off(
        http_server: LoopbackServer, video_corpus: dict[str, CorpusFile], tmp_path: Path,
        declare_length: bool) -> None:
    http_server.serve_file("/v.mp4", Path(video_corpus[CLIP].path),
                           declare_length=declare_length)
    assert code_of(http_server.url("/v.mp4"), loopback(tmp_path, max_video_bytes=1000)) == \
        ErrorCode.VIDEO_TOO_LARGE
    assert list(tmp_path.iterdir()) == []


def test_slow_server_times_out(http_server: LoopbackServer, tmp_path: Path) -> None:
    http_server.stall("/slow", 30.0)
    settings = loopback(tmp_path, fetch_read_timeout_s=0.3)
    assert code_of(http_server.url("/slow"), settings) == ErrorCode.FETCH_TIMEOUT
    with pytest.raises(CaptionflowError) as info:
        fetch(http_server.url("/slow"), settings)
    assert info.value.retriable


def test_redirect_loops_and_statuses(http_server: LoopbackServer, tmp_path: Path) -> None:
    http_server.redirect("/a", "/b")
    http_server.redirect("/b", "/a")
    settings = loopback(tmp_path, fetch_max_redirects=3)
    assert code_of(http_server.url("/a"), settings) == ErrorCode.FETCH_FAILED
    assert code_of(http_server.url("/nothing"), settings) == ErrorCode.VIDEO_NOT_FOUND

    def fail(h) -> None:
        h.send_error(503)

    http_server.routes["/down"] = fail
    with pytest.raises(CaptionflowError) as info:
        fetch(http_server.url("/down"), settings)
    assert info.value.code == ErrorCode.FETCH_FAILED and info.value.retriable


def test_unreachable_server_is_a_retriable_fetch_failure(tmp_path: Path) -> None:
    # A port nothing listens on: connection refused at once.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CaptionflowError) as info:
        fetch(f"http://127.0.0.1:{port}/v.mp4", loopback(tmp_path))
    assert info.value.code == ErrorCode.FETCH_FAILED and info.value.retriable
    assert os.listdir(tmp_path) == []
