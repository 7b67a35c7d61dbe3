"""Decode exactly the sampled frames of a local video file with PyAV.

Two passes over the file:

1. ``probe``: demux every packet of the video stream without decoding (cheap next to
   decoding) to learn the true frame count, every frame's presentation time (so a variable
   frame rate is exact) and where the keyframes are.
2. ``decode_frames``: decode only what the sample needs. Codec threads run frame-parallel
   (``thread_type`` AUTO); packets that are not sampled are decoded with ``skip_frame``
   NONREF so the codec drops frames nothing depends on (h264/hevc, whose decoders apply the
   setting per frame); when the next sampled frame lies in a later GOP (and at least
   ``_MIN_SEEK_GAP_FRAMES`` away) the demuxer seeks straight to its keyframe. Frames are scaled and converted to RGB by libswscale in
   ``frame.reformat``, one frame at a time, so only the sampled frames are ever held.

If the fast path misses a frame (a stream whose index lies), the missing frames are decoded
again linearly, without skipping or seeking; only frames the codec cannot produce at all
make the video unreadable.

On a GPU ``device`` ("cuda", "cuda:N") the same loop runs with FFmpeg's CUDA hwaccel: NVDEC
decodes, PyAV downloads each output frame (NV12) to host memory, and libswscale scales it
as on the CPU path, so the sampling, skipping, seeking and budgets are the same code. The
CPU decoders take over, and ``stats.device_fallback`` says why, when the device cannot be
opened (``device_unavailable``), the codec has no NVDEC decoder (``codec_unsupported``: the
software decoder runs in the same pass), NVDEC runs out of GPU memory
(``device_out_of_memory``), or NVDEC fails on the stream or misses a frame
(``hw_decode_failed``). After the last two every frame is decoded again on the CPU, from a
clean slate, so one clip never mixes the two decoders' output.

Budgets (``video.max_source_pixels``, ``max_source_frames``, ``max_probe_packets``,
``max_duration_s``) are checked from the headers before demuxing, again while demuxing (a
header can lie), and the picture size once more on every decoded frame. The probe keeps
three flat arrays (8 + 8 + 1 bytes per packet), not a Python object per packet.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from fractions import Fraction
from pathlib import Path

import av
import av.error
import numpy as np
from av.codec.hwaccel import HWAccel

from captionflow.errors import (
    DecodeDeviceUnavailableError,
    DecodeOutOfMemoryError,
    VideoEmptyError,
    VideoResolutionTooLargeError,
    VideoTooLongError,
    VideoTooManyFramesError,
    VideoUnreadableError,
)
from captionflow.video.clip import VideoFacts
from captionflow.video.ranged import RemoteVideo

# Decoders that read skip_frame for every frame (others read it once at open, or ignore it).
_SKIP_NONREF_CODECS = frozenset({"h264", "hevc"})
_STILL_IMAGE_FPS = 25.0
# A seek drains the frame-thread pipeline; below this many skipped frames it does not pay.
_MIN_SEEK_GAP_FRAMES = 16
# Frame threads each hold a frame in flight; more than this buys little and costs memory.
_MAX_AUTO_THREADS = 8
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


@dataclass(slots=True)
class DecodeStats:
    packets_decoded: int = 0
    frames_decoded: int = 0
    seeks: int = 0
    decode_errors: int = 0
    linear_fallback: bool = False
    rotation_deg: int = 0
    bytes_read: int = 0  # fetched from an object store by this decode (0 for a local file)
    device: str = "cpu"  # where the frames handed back were decoded
    # Why a GPU decode_device did not decode them: device_unavailable, codec_unsupported,
    # device_out_of_memory, hw_decode_failed ("" when it did, or when the CPU was asked for).
    device_fallback: str = ""


class _DeviceUnavailable(Exception):
    """FFmpeg could not open the hwaccel device for this video."""


class _NoDeviceDecoder(Exception):
    """The device has no decoder for this video's codec."""


def hwaccel_for(device: str) -> HWAccel | None:
    """The PyAV hwaccel for ``video.decode_device`` (None for "cpu")."""
    if device == "cpu":
        return None
    kind, _, ordinal = device.partition(":")
    # Software fallback off: a stream NVDEC cannot take must fail the GPU pass, so that it
    # is decoded again on the CPU and counted, not silently mixed. primary_ctx: every open
    # shares the device's primary CUDA context instead of creating its own (~0.1 s each).
    return HWAccel(kind, device=ordinal or None, allow_software_fallback=False,
                   options={"primary_ctx": "1"})


def check_device(device: str) -> HWAccel | None:
    """Open ``device`` once, as a decode would (for H.264, which every NVDEC has); raise
    ``decode_device_unavailable`` when FFmpeg cannot. Holding the returned context keeps
    the device's primary context alive, so later opens attach to it cheaply."""
    hw = hwaccel_for(device)
    if hw is None:
        return None
    try:
        return hw.create(av.Codec("h264", "r"))
    except (av.error.FFmpegError, NotImplementedError, ValueError) as e:
        raise DecodeDeviceUnavailableError(
            f"video.decode_device={device}: FFmpeg could not open the device ({e}); check "
            "the NVIDIA driver (nvidia-smi) and that the device is visible to this process, "
            "or set video.decode_device=cpu") from e


def _bytes_read(path: Path | RemoteVideo) -> int:
    return 0 if isinstance(path, Path) else path.bytes_read


def _index_keyframe_positions(path: Path | RemoteVideo, stream: av.VideoStream) -> set[int] | None:
    """Byte positions of the keyframes in the container's own index, when the probe read
    the index but not the payload (an object store's index-only read): the codec parser
    that flags keyframes from the payload then saw zeros, the index (MP4 ``stss``) did not."""
    if isinstance(path, Path) or not path.payload_skipped:
        return None
    return {entry.pos for entry in stream.index_entries if entry.is_keyframe}


def _open(path: Path | RemoteVideo, *, index_only: bool = False,
          hwaccel: HWAccel | None = None) -> av.container.InputContainer:
    # A RemoteVideo (object store) is read in ranges through a Python file object.
    target = str(path) if isinstance(path, Path) else path.open(index_only=index_only)
    try:
        return av.open(target, metadata_errors="ignore", hwaccel=hwaccel)
    except av.error.FFmpegError as e:
        if hwaccel is not None:
            # The device, not the file: the CPU pass opens it again and says what is wrong
            # with the file, if anything is.
            raise _DeviceUnavailable(str(e)) from e
        if isinstance(e, av.error.EOFError):
            raise VideoEmptyError(
                f"{path.name} ends before its first frame; send a video with frames in it") from e
        raise VideoUnreadableError(
            f"{path.name} is not a readable video container ({e.strerror or e}); "
            "check the file is complete and in a format FFmpeg can read") from e
    except RuntimeError as e:
        if hwaccel is not None:
            raise _NoDeviceDecoder(str(e)) from e  # PyAV: "no stream is compatible"
        raise


def _video_stream(container: av.container.InputContainer, path: Path) -> av.VideoStream:
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
    bytes_before = _bytes_read(path)
    with _open(path, index_only=True) as container:
        stream = _video_stream(container, path)
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
            raise _out_of_memory(path.name) from e
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
                      seekable=seekable, bytes_read=_bytes_read(path) - bytes_before)


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


Alloc = Callable[[tuple[int, ...]], np.ndarray]


def decode_frames(path: Path | RemoteVideo, index: VideoIndex, frame_indices: list[int], *,
                  height: int, width: int, threads: int = 0,
                  max_source_pixels: int | None = None, device: str = "cpu",
                  alloc: Alloc | None = None) -> tuple[np.ndarray, DecodeStats]:
    """Decode ``frame_indices`` (sorted, repeats allowed) of ``path`` scaled to
    ``height`` x ``width`` (coded orientation), as uint8 RGB ``(T, H, W, 3)`` turned upright.

    The rotation comes from the first decoded frame's display matrix and is returned in
    ``stats.rotation_deg``; a quarter turn swaps the output's height and width. ``alloc``
    makes the output array (e.g. in shared memory); a decoded frame larger than
    ``max_source_pixels`` raises ``video_resolution_too_large``. ``device`` is
    ``video.decode_device`` (see the module docstring for the GPU path and its fallbacks).
    """
    wanted = sorted(set(frame_indices))
    target_pts = [int(index.pts[i]) for i in wanted]
    stats = DecodeStats()
    bytes_before = _bytes_read(path)
    got: dict[int, np.ndarray] = {}
    opts = _Options(height, width, threads, max_source_pixels, path.name)
    if device != "cpu":
        _decode_on_device(path, index, target_pts, got, stats, opts, device)
    if not got:
        _decode_into(path, index, target_pts, got, stats, opts, fast=True)
    missing = [p for p in target_pts if p not in got]
    if missing:
        stats.linear_fallback = True
        _decode_into(path, index, missing, got, stats, opts, fast=False)
        missing = [p for p in target_pts if p not in got]
    if missing:
        if not got:
            raise VideoEmptyError(f"{path.name}: no frame of the video could be decoded")
        raise VideoUnreadableError(
            f"{path.name}: {len(missing)} of {len(target_pts)} sampled frames could not be "
            f"decoded ({stats.decode_errors} decode errors); the file is corrupt")
    turns = stats.rotation_deg // 90  # np.rot90 turns counter-clockwise, as players do
    out_h, out_w = (width, height) if stats.rotation_deg in (90, 270) else (height, width)
    shape = (len(frame_indices), out_h, out_w, 3)
    out = alloc(shape) if alloc is not None else np.empty(shape, np.uint8)
    for row, i in enumerate(frame_indices):
        frame = got[int(index.pts[i])]
        out[row] = np.rot90(frame, k=turns) if turns else frame
    stats.bytes_read = _bytes_read(path) - bytes_before
    return out, stats


def _decode_on_device(path: Path, index: VideoIndex, target_pts: list[int],
                      got: dict[int, np.ndarray], stats: DecodeStats, opts: _Options,
                      device: str) -> None:
    """The fast pass on ``device``; leaves ``got`` empty when the CPU must decode."""
    try:
        _decode_into(path, index, target_pts, got, stats, opts, fast=True, device=device)
    except _DeviceUnavailable:
        reason = "device_unavailable"
    except _NoDeviceDecoder:
        reason = "codec_unsupported"
    except DecodeOutOfMemoryError:
        # NVDEC's surfaces did not fit in the GPU's memory (FFmpeg's ENOMEM); a host that
        # is out of memory fails the CPU pass again, as the event's own error.
        reason = "device_out_of_memory"
    else:
        if stats.device == "cpu":  # the software decoder ran in this pass: nothing to redo
            stats.device_fallback = "codec_unsupported"
            return
        if all(p in got for p in target_pts):
            return
        reason = "hw_decode_failed"
    # The CPU pass starts clean: nothing of the abandoned GPU pass is counted or kept.
    got.clear()
    for field in fields(DecodeStats):
        setattr(stats, field.name, field.default)
    stats.device_fallback = reason


@dataclass(frozen=True, slots=True)
class _Options:
    height: int
    width: int
    threads: int
    max_source_pixels: int | None
    name: str


def _decode_into(path: Path, index: VideoIndex, target_pts: list[int], got: dict[int, np.ndarray],
                 stats: DecodeStats, opts: _Options, *, fast: bool, device: str = "cpu") -> None:
    targets = set(target_pts)
    pending = sorted(targets)  # pending[0] is the next frame still to come
    height, width = opts.height, opts.width
    hwaccel = hwaccel_for(device)
    with _open(path, hwaccel=hwaccel) as container:
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if hwaccel is not None and ctx.is_hwaccel:
            stats.device = device
        ctx.thread_type = "AUTO"
        ctx.thread_count = opts.threads or min(os.cpu_count() or 1, _MAX_AUTO_THREADS)
        if stats.device != "cpu":
            # Each frame thread adds a decode surface, and NVDEC refuses more than 32: a
            # stream with many reference frames would fail. NVDEC decodes asynchronously
            # anyway; the CPU only parses.
            ctx.thread_count = 1
        skip_ok = fast and ctx.name in _SKIP_NONREF_CODECS
        seek_ok = fast and index.seekable and len(index.keyframe_pts) > 1
        skip_mode = "DEFAULT"
        seeked_to: set[int] = set()

        def take(frames: list[av.VideoFrame]) -> None:
            for frame in frames:
                check_pixels(opts.name, frame.width, frame.height, opts.max_source_pixels,
                             "a decoded frame")
                if stats.frames_decoded == 0:
                    # The display matrix angle, counter-clockwise, as ffprobe reports it.
                    stats.rotation_deg = int(round(frame.rotation)) % 360
                stats.frames_decoded += 1
                pts = frame.pts if frame.pts is not None else frame.dts
                if pts in targets and pts not in got:
                    got[pts] = frame.reformat(width=width, height=height,
                                              format="rgb24").to_ndarray()
            while pending and pending[0] in got:
                pending.pop(0)

        packets: Iterator[av.Packet] = container.demux(stream)
        while pending:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.error.FFmpegError:
                stats.decode_errors += 1
                break
            if packet.size == 0:
                continue
            pts = packet.pts if packet.pts is not None else packet.dts
            if seek_ok and pts is not None:
                gop_start = _gop_start(index.keyframe_pts, pending[0])
                if gop_start > _gop_start(index.keyframe_pts, pts) and \
                        gop_start not in seeked_to and \
                        _frames_between(index, pts, gop_start) >= _MIN_SEEK_GAP_FRAMES:
                    # Nothing sampled before gop_start: drain what is in flight, jump there.
                    take(_drain(ctx, stats, opts.name))
                    seeked_to.add(gop_start)
                    container.seek(gop_start, stream=stream, backward=True)
                    ctx.flush_buffers()
                    stats.seeks += 1
                    packets = container.demux(stream)
                    continue
            if skip_ok:
                mode = "DEFAULT" if pts in targets else "NONREF"
                if mode != skip_mode:
                    ctx.skip_frame = skip_mode = mode
            stats.packets_decoded += 1
            try:
                take(ctx.decode(packet))
            except av.error.MemoryError as e:
                raise _out_of_memory(opts.name) from e
            except av.error.FFmpegError:
                stats.decode_errors += 1
        take(_drain(ctx, stats, opts.name))


def _out_of_memory(name: str) -> DecodeOutOfMemoryError:
    return DecodeOutOfMemoryError(
        f"decoding {name} ran out of memory (video.decode_memory_limit_bytes); send a "
        "smaller video or raise the limit")


def _drain(ctx: av.VideoCodecContext, stats: DecodeStats, name: str) -> list[av.VideoFrame]:
    try:
        return list(ctx.decode(None))
    except av.error.MemoryError as e:
        raise _out_of_memory(name) from e
    except av.error.FFmpegError:
        stats.decode_errors += 1
        return []


def _gop_start(keyframe_pts: np.ndarray, pts: int) -> int:
    i = int(np.searchsorted(keyframe_pts, pts, side="right")) - 1
    return int(keyframe_pts[max(i, 0)])


def _frames_between(index: VideoIndex, from_pts: int, to_pts: int) -> int:
    return int(np.searchsorted(index.pts, to_pts) - np.searchsorted(index.pts, from_pts))
