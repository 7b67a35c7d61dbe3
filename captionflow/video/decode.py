"""Decode exactly the sampled frames of a local video file with PyAV.

After the probe pass (demux.py: the frame index and the budgets), ``decode_frames``
decodes only what the sample needs. Codec threads run frame-parallel
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

The picture size is checked once more on every decoded frame (``video.max_source_pixels``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import av
import av.error
import numpy as np
from av.codec.hwaccel import HWAccel

from captionflow.errors import (
    DecodeDeviceUnavailableError,
    DecodeOutOfMemoryError,
    VideoEmptyError,
    VideoUnreadableError,
)
from captionflow.video.demux import (
    DeviceUnavailable,
    NoDeviceDecoder,
    VideoIndex,
    bytes_read,
    check_pixels,
    open_container,
    out_of_memory,
)
from captionflow.video.ranged import RemoteVideo

# Decoders that read skip_frame for every frame (others read it once at open, or ignore it).
_SKIP_NONREF_CODECS = frozenset({"h264", "hevc"})
# A seek drains the frame-thread pipeline; below this many skipped frames it does not pay.
_MIN_SEEK_GAP_FRAMES = 16
# Frame threads each hold a frame in flight; more than this buys little and costs memory.
_MAX_AUTO_THREADS = 8


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
    bytes_before = bytes_read(path)
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
    stats.bytes_read = bytes_read(path) - bytes_before
    return out, stats


def _decode_on_device(path: Path, index: VideoIndex, target_pts: list[int],
                      got: dict[int, np.ndarray], stats: DecodeStats, opts: _Options,
                      device: str) -> None:
    """The fast pass on ``device``; leaves ``got`` empty when the CPU must decode."""
    try:
        _decode_into(path, index, target_pts, got, stats, opts, fast=True, device=device)
    except DeviceUnavailable:
        reason = "device_unavailable"
    except NoDeviceDecoder:
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
    with open_container(path, hwaccel=hwaccel) as container:
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
                raise out_of_memory(opts.name) from e
            except av.error.FFmpegError:
                stats.decode_errors += 1
        take(_drain(ctx, stats, opts.name))


def _drain(ctx: av.VideoCodecContext, stats: DecodeStats, name: str) -> list[av.VideoFrame]:
    try:
        return list(ctx.decode(None))
    except av.error.MemoryError as e:
        raise out_of_memory(name) from e
    except av.error.FFmpegError:
        stats.decode_errors += 1
        return []


def _gop_start(keyframe_pts: np.ndarray, pts: int) -> int:
    i = int(np.searchsorted(keyframe_pts, pts, side="right")) - 1
    return int(keyframe_pts[max(i, 0)])


def _frames_between(index: VideoIndex, from_pts: int, to_pts: int) -> int:
    return int(np.searchsorted(index.pts, to_pts) - np.searchsorted(index.pts, from_pts))
