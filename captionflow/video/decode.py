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
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import av.error
import numpy as np

from captionflow.errors import VideoEmptyError, VideoTooLongError, VideoUnreadableError
from captionflow.video.clip import VideoFacts

# Decoders that read skip_frame for every frame (others read it once at open, or ignore it).
_SKIP_NONREF_CODECS = frozenset({"h264", "hevc"})
_STILL_IMAGE_FPS = 25.0
# A seek drains the frame-thread pipeline; below this many skipped frames it does not pay.
_MIN_SEEK_GAP_FRAMES = 16


@dataclass(frozen=True, slots=True)
class VideoIndex:
    """What the demux pass learned: frame ``i`` (presentation order) has ``pts[i]``."""

    facts: VideoFacts
    pts: tuple[int, ...]
    time_base: Fraction
    keyframe_pts: tuple[int, ...]
    # False when a GOP has frames shown before its keyframe (open GOP): seeking is unsafe.
    seekable: bool

    def timestamp_s(self, frame_index: int) -> float:
        return round(float((self.pts[frame_index] - self.pts[0]) * self.time_base), 6)


@dataclass(slots=True)
class DecodeStats:
    packets_decoded: int = 0
    frames_decoded: int = 0
    seeks: int = 0
    decode_errors: int = 0
    linear_fallback: bool = False
    rotation_deg: int = 0


def _open(path: Path) -> av.container.InputContainer:
    try:
        return av.open(str(path), metadata_errors="ignore")
    except av.error.EOFError as e:
        raise VideoEmptyError(
            f"{path.name} ends before its first frame; send a video with frames in it") from e
    except av.error.FFmpegError as e:
        raise VideoUnreadableError(
            f"{path.name} is not a readable video container ({e.strerror or e}); "
            "check the file is complete and in a format FFmpeg can read") from e


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


def probe(path: Path, *, max_duration_s: float) -> VideoIndex:
    """Demux ``path`` (no decoding) and return its frame index and facts."""
    size_bytes = path.stat().st_size
    if size_bytes == 0:
        raise VideoEmptyError(f"{path.name} is empty (0 bytes)")
    with _open(path) as container:
        stream = _video_stream(container, path)
        codec = stream.codec_context.codec.canonical_name
        tb = stream.time_base or Fraction(1, 90000)
        header_s = _header_duration_s(container, stream)
        if header_s is not None and header_s > max_duration_s:
            raise VideoTooLongError(
                f"{path.name} lasts {header_s:.0f} s, over video.max_duration_s="
                f"{max_duration_s:.0f}; send a shorter video or raise the limit")
        packets: list[tuple[int, bool, int]] = []  # (pts, keyframe, duration), decode order
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                pts = packet.pts if packet.pts is not None else packet.dts
                if pts is None:
                    pts = packets[-1][0] + 1 if packets else 0
                packets.append((pts, packet.is_keyframe, packet.duration or 0))
        except av.error.FFmpegError:
            pass  # a truncated tail: index what was readable
        width, height = stream.codec_context.width, stream.codec_context.height
        guessed = float(stream.guessed_rate or stream.average_rate or 0) or _STILL_IMAGE_FPS
    if not packets:
        raise VideoEmptyError(f"{path.name} has a video stream but no frames in it")
    if width <= 0 or height <= 0:
        raise VideoUnreadableError(f"{path.name}: the video stream has no picture size")
    pts_sorted = sorted({p for p, _, _ in packets})
    keyframes = sorted({p for p, key, _ in packets if key}) or [pts_sorted[0]]
    seekable = True
    last_key = None
    for pts, key, _ in packets:
        if key:
            last_key = pts
        elif last_key is not None and pts < last_key:
            seekable = False
            break
    if len(pts_sorted) > 1:
        deltas = np.diff(pts_sorted)
        last_dur = max(packets, key=lambda p: p[0])[2] or int(np.median(deltas))
        duration_s = float((pts_sorted[-1] - pts_sorted[0] + last_dur) * tb)
    else:
        duration_s = 1.0 / guessed
    if duration_s > max_duration_s:
        raise VideoTooLongError(
            f"{path.name} lasts {duration_s:.0f} s, over video.max_duration_s="
            f"{max_duration_s:.0f}; send a shorter video or raise the limit")
    fps = len(pts_sorted) / duration_s if duration_s > 0 else guessed
    facts = VideoFacts(duration_s=round(duration_s, 6), source_fps=round(fps, 6),
                       total_frames=len(pts_sorted), width=width, height=height, codec=codec,
                       size_bytes=size_bytes)
    return VideoIndex(facts=facts, pts=tuple(pts_sorted), time_base=tb,
                      keyframe_pts=tuple(keyframes), seekable=seekable)


def _header_duration_s(container: av.container.InputContainer,
                       stream: av.VideoStream) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return None


def decode_frames(path: Path, index: VideoIndex, frame_indices: list[int], *,
                  height: int, width: int, threads: int = 0) -> tuple[np.ndarray, DecodeStats]:
    """Decode ``frame_indices`` (sorted, repeats allowed) of ``path`` scaled to
    ``height`` x ``width`` (coded orientation), as uint8 RGB ``(T, H, W, 3)`` turned upright.

    The rotation comes from the first decoded frame's display matrix and is returned in
    ``stats.rotation_deg``; a quarter turn swaps the output's height and width.
    """
    wanted = sorted(set(frame_indices))
    target_pts = [index.pts[i] for i in wanted]
    stats = DecodeStats()
    got: dict[int, np.ndarray] = {}
    _decode_into(path, index, target_pts, got, stats, height, width, threads, fast=True)
    missing = [p for p in target_pts if p not in got]
    if missing:
        stats.linear_fallback = True
        _decode_into(path, index, missing, got, stats, height, width, threads, fast=False)
        missing = [p for p in target_pts if p not in got]
    if missing:
        if not got:
            raise VideoEmptyError(f"{path.name}: no frame of the video could be decoded")
        raise VideoUnreadableError(
            f"{path.name}: {len(missing)} of {len(target_pts)} sampled frames could not be "
            f"decoded ({stats.decode_errors} decode errors); the file is corrupt")
    turns = stats.rotation_deg // 90  # np.rot90 turns counter-clockwise, as players do
    out_h, out_w = (width, height) if stats.rotation_deg in (90, 270) else (height, width)
    out = np.empty((len(frame_indices), out_h, out_w, 3), np.uint8)
    for row, i in enumerate(frame_indices):
        out[row] = np.rot90(got[index.pts[i]], k=turns) if turns else got[index.pts[i]]
    return out, stats


def _decode_into(path: Path, index: VideoIndex, target_pts: list[int], got: dict[int, np.ndarray],
                 stats: DecodeStats, height: int, width: int, threads: int, *,
                 fast: bool) -> None:
    targets = set(target_pts)
    pending = sorted(targets)  # pending[0] is the next frame still to come
    with _open(path) as container:
        stream = container.streams.video[0]
        ctx = stream.codec_context
        ctx.thread_type = "AUTO"
        ctx.thread_count = threads or min(os.cpu_count() or 1, 16)
        skip_ok = fast and ctx.name in _SKIP_NONREF_CODECS
        seek_ok = fast and index.seekable and len(index.keyframe_pts) > 1
        skip_mode = "DEFAULT"
        seeked_to: set[int] = set()

        def take(frames: list[av.VideoFrame]) -> None:
            for frame in frames:
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
                    take(_drain(ctx, stats))
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
            except av.error.FFmpegError:
                stats.decode_errors += 1
        take(_drain(ctx, stats))


def _drain(ctx: av.VideoCodecContext, stats: DecodeStats) -> list[av.VideoFrame]:
    try:
        return list(ctx.decode(None))
    except av.error.FFmpegError:
        stats.decode_errors += 1
        return []


def _gop_start(keyframe_pts: tuple[int, ...], pts: int) -> int:
    i = bisect.bisect_right(keyframe_pts, pts) - 1
    return keyframe_pts[max(i, 0)]


def _frames_between(index: VideoIndex, from_pts: int, to_pts: int) -> int:
    return bisect.bisect_left(index.pts, to_pts) - bisect.bisect_left(index.pts, from_pts)
