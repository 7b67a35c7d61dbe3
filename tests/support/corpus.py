"""A small corpus of real encoded videos, made with PyAV, for the video tests.

Every frame carries its own index in its pixels: a grid of big black/white blocks, one bit
each, which survives compression, chroma subsampling and rescaling. ``read_index`` reads it
back, so a test can check that the frames a sampler returned are exactly the ones it meant.

Clips are tiny (at most 176x144, at most 10 s) so the whole corpus builds in a few seconds.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from captionflow.errors import ErrorCode

# SVT-AV1 logs its whole configuration to stderr unless told otherwise.
os.environ.setdefault("SVT_LOG", "1")

CODE_COLS = 4
CODE_ROWS = 3
CODE_BITS = CODE_COLS * CODE_ROWS
_MARGIN = 0.08


@dataclass(frozen=True)
class CorpusFile:
    name: str
    path: str
    # For playable files: what a correct decoder must report.
    codec: str | None = None
    frames: int = 0
    fps: float = 0.0
    width: int = 0
    height: int = 0
    rotation_deg: int = 0
    gop: int = 0
    vfr: bool = False
    # For bad files: the error code the sampler must raise (None = must decode).
    error: str | None = None
    # Bad files whose outcome depends on the decoder (bit flips in the payload): any of these.
    errors_allowed: tuple[str, ...] = ()


def draw_index(index: int, width: int, height: int) -> np.ndarray:
    """An RGB frame whose blocks spell ``index`` in binary (most significant bit first)."""
    frame = np.full((height, width, 3), 128, np.uint8)
    ys = np.linspace(height * _MARGIN, height * (1 - _MARGIN), CODE_ROWS + 1).astype(int)
    xs = np.linspace(width * _MARGIN, width * (1 - _MARGIN), CODE_COLS + 1).astype(int)
    for bit in range(CODE_BITS):
        row, col = divmod(bit, CODE_COLS)
        on = (index >> (CODE_BITS - 1 - bit)) & 1
        frame[ys[row]:ys[row + 1], xs[col]:xs[col + 1]] = 235 if on else 16
    return frame


def read_index(frame: np.ndarray) -> int:
    """The index ``draw_index`` wrote into ``frame`` (any size, upright)."""
    height, width = frame.shape[:2]
    ys = np.linspace(height * _MARGIN, height * (1 - _MARGIN), CODE_ROWS + 1)
    xs = np.linspace(width * _MARGIN, width * (1 - _MARGIN), CODE_COLS + 1)
    value = 0
    for bit in range(CODE_BITS):
        row, col = divmod(bit, CODE_COLS)
        # Read the middle half of the block: edges blur under compression and scaling.
        y0, y1 = ys[row], ys[row + 1]
        x0, x1 = xs[col], xs[col + 1]
        cy0, cy1 = int(y0 + (y1 - y0) / 4), int(np.ceil(y1 - (y1 - y0) / 4))
        cx0, cx1 = int(x0 + (x1 - x0) / 4), int(np.ceil(x1 - (x1 - x0) / 4))
        luma = frame[cy0:cy1, cx0:cx1].mean()
        value = (value << 1) | int(luma > 128)
    return value


def _encode(path: Path, codec: str, *, width: int, height: int, fps: int, frames: int,
            gop: int = 0, pix_fmt: str = "yuv420p", options: dict[str, str] | None = None,
            rotation_deg: int = 0, pts_s: list[float] | None = None,
            fmt: str | None = None) -> None:
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if gop:
            stream.codec_context.gop_size = gop
        if pts_s is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation_deg:
            stream.set_display_rotation(rotation_deg)
        if not frames:
            container.start_encoding()
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(draw_index(i, width, height), format="rgb24")
            if pts_s is not None:
                frame.pts, frame.time_base = round(pts_s[i] * 1000), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _audio_only(path: Path) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = np.zeros((1, 1024), np.float32)
        for i in range(16):
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _still(path: Path, codec: str, pix_fmt: str, width: int, height: int) -> None:
    ctx = av.CodecContext.create(codec, "w")
    ctx.width, ctx.height, ctx.pix_fmt = width, height, pix_fmt
    ctx.time_base = Fraction(1, 25)
    frame = av.VideoFrame.from_ndarray(draw_index(5, width, height), format="rgb24")
    frame = frame.reformat(format=pix_fmt)
    data = b"".join(bytes(p) for p in ctx.encode(frame)) + b"".join(bytes(p) for p in ctx.encode())
    path.write_bytes(data)


def _flip_bits(src: Path, dst: Path, *, start: int, stop: int | None, stride: int) -> None:
    data = bytearray(src.read_bytes())
    for pos in range(start, stop if stop is not None else len(data), stride):
        data[pos] ^= 0xA5
    dst.write_bytes(bytes(data))


X264 = {"preset": "ultrafast", "tune": "zerolatency"}
X264_B = {"preset": "veryfast", "bf": "2"}
# Frame intervals cycle 40, 40, 100 ms: a variable frame rate a decoder cannot guess.
VFR_PTS_S = [round(sum((0.04, 0.04, 0.1)[j % 3] for j in range(i)), 3) for i in range(60)]


def build_corpus(root: Path) -> dict[str, CorpusFile]:
    """Write every corpus file under ``root`` (reusing a complete earlier build)."""
    manifest = root / "manifest.json"
    if manifest.exists():
        return {k: CorpusFile(**v) for k, v in json.loads(manifest.read_text()).items()}
    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, CorpusFile] = {}

    def good(name: str, make: Callable[[Path], None], **facts: object) -> None:
        path = root / name
        make(path)
        files[name] = CorpusFile(name=name, path=str(path), **facts)  # type: ignore[arg-type]

    def bad(name: str, make: Callable[[Path], None], error: ErrorCode | None,
            errors_allowed: tuple[ErrorCode, ...] = ()) -> None:
        path = root / name
        make(path)
        files[name] = CorpusFile(name=name, path=str(path), error=error and str(error),
                                 errors_allowed=tuple(str(e) for e in errors_allowed))

    good("h264_160x120_30fps.mp4", lambda p: _encode(
        p, "libx264", width=160, height=120, fps=30, frames=90, gop=12, options=X264_B),
        codec="h264", frames=90, fps=30, width=160, height=120, gop=12)
    good("h264_longgop_128x96_25fps.mp4", lambda p: _encode(
        p, "libx264", width=128, height=96, fps=25, frames=250, gop=250, options=X264_B),
        codec="h264", frames=250, fps=25, width=128, height=96, gop=250)
    good("h264_gop10_128x96_25fps_10s.mp4", lambda p: _encode(
        p, "libx264", width=128, height=96, fps=25, frames=250, gop=10,
        options={**X264_B, "sc_threshold": "0"}),
        codec="h264", frames=250, fps=25, width=128, height=96, gop=10)
    good("hevc_128x96_24fps.mp4", lambda p: _encode(
        p, "libx265", width=128, height=96, fps=24, frames=48, gop=24,
        options={"preset": "ultrafast", "x265-params": "log-level=none"}),
        codec="hevc", frames=48, fps=24, width=128, height=96, gop=24)
    good("vp9_odd_65x49_15fps.webm", lambda p: _encode(
        p, "libvpx-vp9", width=65, height=49, fps=15, frames=30, gop=15,
        options={"deadline": "realtime", "cpu-used": "8"}),
        codec="vp9", frames=30, fps=15, width=65, height=49, gop=15)
    good("av1_96x64_24fps.mkv", lambda p: _encode(
        p, "libsvtav1", width=96, height=64, fps=24, frames=24, gop=24,
        options={"preset": "12", "svtav1-params": "lp=1"}),
        codec="av1", frames=24, fps=24, width=96, height=64, gop=24)
    good("mpeg4_176x144_10fps.avi", lambda p: _encode(
        p, "mpeg4", width=176, height=144, fps=10, frames=30, gop=10),
        codec="mpeg4", frames=30, fps=10, width=176, height=144, gop=10)
    good("h264_rotated90_96x64.mp4", lambda p: _encode(
        p, "libx264", width=96, height=64, fps=20, frames=20, options=X264, rotation_deg=90),
        codec="h264", frames=20, fps=20, width=96, height=64, rotation_deg=90)
    good("h264_vfr_96x64.mp4", lambda p: _encode(
        p, "libx264", width=96, height=64, fps=25, frames=len(VFR_PTS_S), options=X264,
        pts_s=VFR_PTS_S),
        codec="h264", frames=len(VFR_PTS_S), width=96, height=64, vfr=True,
        fps=len(VFR_PTS_S) / (VFR_PTS_S[-1] + 0.04))
    good("still.png", lambda p: _still(p, "png", "rgb24", 64, 48),
         codec="png", frames=1, width=64, height=48)
    good("still.jpg", lambda p: _still(p, "mjpeg", "yuvj420p", 64, 48),
         codec="mjpeg", frames=1, width=64, height=48)

    base = root / "h264_160x120_30fps.mp4"
    size = base.stat().st_size
    bad("audio_only.m4a", _audio_only, ErrorCode.VIDEO_UNREADABLE)
    bad("zero_length.mp4", lambda p: p.write_bytes(b""), ErrorCode.VIDEO_EMPTY)
    bad("no_frames.mkv", lambda p: _encode(
        p, "libx264", width=64, height=48, fps=25, frames=0, options=X264),
        ErrorCode.VIDEO_EMPTY)
    bad("truncated.mp4", lambda p: p.write_bytes(base.read_bytes()[: size * 6 // 10]),
        ErrorCode.VIDEO_UNREADABLE)
    bad("not_a_video.mp4", lambda p: p.write_bytes(b"this is a text file, not a video\n" * 40),
        ErrorCode.VIDEO_UNREADABLE)
    # Flipping the container's first bytes destroys the box structure: never readable.
    bad("bitflip_header.mp4", lambda p: _flip_bits(base, p, start=0, stop=64, stride=1),
        ErrorCode.VIDEO_UNREADABLE)
    # Flips inside the coded frames: the decoder may conceal them (frames come back) or
    # report them (unreadable); either is correct, a crash or a hang is not.
    webm = root / "vp9_odd_65x49_15fps.webm"
    bad("bitflip_payload.webm",
        lambda p: _flip_bits(webm, p, start=400, stop=None, stride=37), None,
        errors_allowed=(ErrorCode.VIDEO_UNREADABLE, ErrorCode.VIDEO_EMPTY))
    manifest.write_text(json.dumps({k: asdict(v) for k, v in files.items()}, indent=1))
    return files


if __name__ == "__main__":
    import sys

    started = time.perf_counter()
    corpus = build_corpus(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/captionflow-corpus"))
    print(f"{len(corpus)} files in {time.perf_counter() - started:.2f} s")
