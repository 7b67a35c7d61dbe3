"""Opening a video and the probe pass: demux every packet of the video stream without
decoding (cheap next to decoding) to learn the true frame count, every frame's presentation
time (so a variable frame rate is exact) and where the keyframes are (``VideoIndex``), and
enforce the budgets (``video.max_source_pixels``, ``max_source_frames``,
``max_probe_packets``, ``max_duration_s``) from the headers before demuxing and again while
demuxing (a header can lie). The probe keeps three flat arrays (8 + 8 + 1 bytes per packet),
not a Python object per packet. Decoding the sampled frames is decode.py's.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import av.error
import numpy as np
from av.codec.hwaccel import HWAccel

from captionflow.errors import (
    DecodeOutOfMemoryError,
    VideoEmptyError,
    VideoResolutionTooLargeError,
    VideoTooLongError,
    VideoTooManyFramesError,
    VideoUnreadableError,
)
from captionflow.video.clip import VideoFacts
from captionflow.video.ranged import RemoteVideo

_STILL_IMAGE_FPS = 25.0
# How often (in packets) the probe re-checks the duration budget while demuxing.
_CHECK_EVERY_PACKETS = 1024


@dataclass(frozen=True, slots=True, eq=False)
class VideoIndex:
    """What the demux pass learned: frame ``i`` (presentation order) has ``pts[i]``.

    ``pts`` and ``keyframe_pts`` are sorted int64 arrays (8 bytes a frame)."""

    facts: VideoFacts
    pts: np.ndarray
    time_base: Fraction
    keyframe_pts: np.ndarray
    # False when a GOP has frames shown before its keyframe (open GOP): seeking is unsafe.
    seekable: bool
    # Bytes this probe fetched from an object store (0 for a local file).
    bytes_read: int = 0

    def timestamp_s(self, frame_index: int) -> float:
        return round(float((int(self.pts[frame_index]) - int(self.pts[0])) * self.time_base), 6)


def check_pixels(name: str, width: int, height: int, max_source_pixels: int | None,
                 where: str) -> None:
    if max_source_pixels is not None and width * height > max_source_pixels:
        raise VideoResolutionTooLargeError(
            f"{name} is {width}x{height} ({where}), over video.max_source_pixels="
            f"{max_source_pixels}; send a smaller video or raise the limit")


class DeviceUnavailable(Exception):
    """FFmpeg could not open the hwaccel device for this video."""


class NoDeviceDecoder(Exception):
    """The device has no decoder for this video's codec."""


def bytes_read(path: Path | RemoteVideo) -> int:
    return 0 if isinstance(path, Path) else path.bytes_read


def _index_keyframe_positions(path: Path | RemoteVideo, stream: av.VideoStream) -> set[int] | None:
    """Byte positions of the keyframes in the container's own index, when the probe read
    the index but not the payload (an object store's index-only read): the codec parser
    that flags keyframes from the payload then saw zeros, the index (MP4 ``stss``) did not."""
    if isinstance(path, Path) or not path.payload_skipped:
        return None
    return {entry.pos for entry in stream.index_entries if entry.is_keyframe}


def open_container(path: Path | RemoteVideo, *, index_only: bool = False,
          hwaccel: HWAccel | None = None) -> av.container.InputContainer:
    # A RemoteVideo (object store) is read in ranges through a Python file object.
    target = str(path) if isinstance(path, Path) else path.open(index_only=index_only)
    try:
        return av.open(target, metadata_errors="ignore", hwaccel=hwaccel)
    except av.error.FFmpegError as e:
        if hwaccel is not None:
            # The device, not the file: the CPU pass opens it again and says what is wrong
            # with the file, if anything is.
            raise DeviceUnavailable(str(e)) from e
        if isinstance(e, av.error.EOFError):
            raise VideoEmptyError(
                f"{path.name} ends before its first frame; send a video with frames in it") from e
        raise VideoUnreadableError(
            f"{path.name} is not a readable video container ({e.strerror or e}); "
            "check the file is complete and in a format FFmpeg can read") from e
    except RuntimeError as e:
        if hwaccel is not None:
            raise NoDeviceDecoder(str(e)) from e  # PyAV: "no stream is compatible"
        raise


def video_stream(container: av.container.InputContainer, path: Path) -> av.VideoStream:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise VideoUnreadableError(
            f"{path.name} has no video stream (streams: {', '.join(kinds)}); send a video file")
    stream = container.streams.video[0]
    try:
        stream.codec_context.name
    except (AttributeError, av.error.FFmpegError) as e:
        raise VideoUnreadableError(
            f"{path.name}: no decoder for its video codec; re-encode it as H.264, HEVC, VP9 "
            "or AV1") from e
    return stream


def probe(path: Path | RemoteVideo, *, max_duration_s: float, max_source_pixels: int | None = None,
          max_source_frames: int | None = None, max_probe_packets: int | None = None,
          duration_setting: str = "video.max_duration_s") -> VideoIndex:
    """Demux ``path`` (no decoding) and return its frame index and facts, enforcing the
    budgets (None = no limit) from the headers first and again while demuxing;
    ``duration_setting`` names the setting behind ``max_duration_s`` in the error."""
    size_bytes = path.stat().st_size if isinstance(path, Path) else path.size_bytes
    if size_bytes == 0:
        raise VideoEmptyError(f"{path.name} is empty (0 bytes)")
    bytes_before = bytes_read(path)
    with open_container(path, index_only=True) as container:
        stream = video_stream(container, path)
        codec = stream.codec_context.codec.canonical_name
        tb = stream.time_base or Fraction(1, 90000)
        check_pixels(path.name, stream.codec_context.width, stream.codec_context.height,
                     max_source_pixels, "stream header")
        header_s = _header_duration_s(container, stream)
        if header_s is not None and header_s > max_duration_s:
            raise _too_long(path, header_s, max_duration_s, duration_setting)
        if max_source_frames is not None and (stream.frames or 0) > max_source_frames:
            raise _too_many_frames(path, f"{stream.frames} frames (stream header)",
                                   max_source_frames)
        pts_list = array("q")  # decode order
        dur_list = array("q")
        key_list = bytearray()
        index_keys = _index_keyframe_positions(path, stream)
        max_ticks = max_duration_s / tb if tb else None
        first_pts: int | None = None
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                pts = packet.pts if packet.pts is not None else packet.dts
                if pts is None:
                    pts = pts_list[-1] + 1 if pts_list else 0
                pts_list.append(pts)
                dur_list.append(packet.duration or 0)
                key_list.append(packet.is_keyframe if index_keys is None
                                else packet.pos in index_keys)
                n = len(pts_list)
                if max_probe_packets is not None and n > max_probe_packets:
                    raise _too_many_frames(path, f"over {max_probe_packets} packets",
                                           max_probe_packets, "max_probe_packets")
                if n % _CHECK_EVERY_PACKETS == 0 and max_ticks is not None:
                    first_pts = pts_list[0] if first_pts is None else first_pts
                    if pts - first_pts > max_ticks:
                        raise _too_long(path, float((pts - first_pts) * tb), max_duration_s,
                                        duration_setting)
        except av.error.MemoryError as e:
            raise out_of_memory(path.name) from e
        except av.error.FFmpegError:
            pass  # a truncated tail: index what was readable
        width, height = stream.codec_context.width, stream.codec_context.height
        guessed = float(stream.guessed_rate or stream.average_rate or 0) or _STILL_IMAGE_FPS
    if not pts_list:
        raise VideoEmptyError(f"{path.name} has a video stream but no frames in it")
    if width <= 0 or height <= 0:
        raise VideoUnreadableError(f"{path.name}: the video stream has no picture size")
    check_pixels(path.name, width, height, max_source_pixels, "after demuxing")
    pts_all = np.frombuffer(pts_list, np.int64)
    keys = np.frombuffer(key_list, np.uint8).astype(bool)
    pts_sorted = np.unique(pts_all)
    if max_source_frames is not None and len(pts_sorted) > max_source_frames:
        raise _too_many_frames(path, f"{len(pts_sorted)} frames", max_source_frames)
    keyframes = np.unique(pts_all[keys]) if keys.any() else pts_sorted[:1].copy()
    # Open GOP: a packet after a keyframe (decode order) shown before it.
    key_at = np.maximum.accumulate(np.where(keys, np.arange(len(keys)), -1))
    after_key = key_at >= 0
    seekable = not bool(np.any(after_key & ~keys &
                               (pts_all < pts_all[np.maximum(key_at, 0)])))
    if len(pts_sorted) > 1:
        last_dur = int(dur_list[int(np.argmax(pts_all))]) or int(np.median(np.diff(pts_sorted)))
        duration_s = float((int(pts_sorted[-1]) - int(pts_sorted[0]) + last_dur) * tb)
    else:
        duration_s = 1.0 / guessed
    if duration_s > max_duration_s:
        raise _too_long(path, duration_s, max_duration_s, duration_setting)
    fps = len(pts_sorted) / duration_s if duration_s > 0 else guessed
    facts = VideoFacts(duration_s=round(duration_s, 6), source_fps=round(fps, 6),
                       total_frames=len(pts_sorted), width=width, height=height, codec=codec,
                       size_bytes=size_bytes)
    return VideoIndex(facts=facts, pts=pts_sorted, time_base=tb, keyframe_pts=keyframes,
                      seekable=seekable, bytes_read=bytes_read(path) - bytes_before)


def _too_long(path: Path, seconds: float, max_duration_s: float,
              setting: str = "video.max_duration_s") -> VideoTooLongError:
    windows = "" if setting == "video.max_duration_s" else " (what the windows cover)"
    return VideoTooLongError(
        f"{path.name} lasts {seconds:.0f} s, over {setting}={max_duration_s:.0f} s"
        f"{windows}; send a shorter video or raise the limit"
        + ("" if windows else ", or enable windows (video.window_s)"))


def _too_many_frames(path: Path, what: str, limit: int,
                     setting: str = "max_source_frames") -> VideoTooManyFramesError:
    return VideoTooManyFramesError(
        f"{path.name} has {what}, over video.{setting}={limit}; send a shorter video or "
        "raise the limit")


def _header_duration_s(container: av.container.InputContainer,
                       stream: av.VideoStream) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return None


def out_of_memory(name: str) -> DecodeOutOfMemoryError:
    return DecodeOutOfMemoryError(
        f"decoding {name} ran out of memory (video.decode_memory_limit_bytes); send a "
        "smaller video or raise the limit")
