"""Decoded clips between the Ray stages: one row's frames as one flat uint8 array (every
window's frames back to back) in an Arrow tensor column, so they travel through Ray's object
store without pickling, and the facts about each clip as JSON beside them.

On the engine side :class:`DecodedClips` is the :class:`captionflow.video.clip.ClipStream`
that :func:`captionflow.captioning.caption_event` reads: the clips decoded by the CPU stage,
with what the caption cache keys need (the video's validator, each clip as planned), so
the cache works on Ray as it does in ``captionflow run``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import orjson
import pyarrow as pa

from captionflow import errors
from captionflow.errors import CaptionflowError, ErrorCode, EventError
from captionflow.video.clip import Clip, VideoFacts

# Columns the stages add (their names are part of the library form's contract).
FRAMES = "captionflow_frames"
CLIPS = "captionflow_clips"
DECODE_ERROR = "captionflow_decode_error"
STAGE_COLUMNS = (FRAMES, CLIPS, DECODE_ERROR)
EMPTY_FRAMES = np.zeros(0, np.uint8)


def pack_clips(clips: list[Clip], *, identities: list[dict[str, Any]],
               validator: str | None, fetch_decode_s: float) -> tuple[np.ndarray, bytes]:
    """Frames (flat uint8) and the JSON that gives each clip back."""
    meta = {"validator": validator, "fetch_decode_s": fetch_decode_s, "clips": [
        {"shape": list(c.frames.shape), "frame_indices": list(c.frame_indices),
         "timestamps_s": list(c.timestamps_s), "sample_fps": c.sample_fps,
         "facts": dataclasses.asdict(c.facts), "start_s": c.start_s, "end_s": c.end_s,
         "window_index": c.window_index, "extra": c.extra, "identity": identity}
        for c, identity in zip(clips, identities, strict=True)]}
    flat = np.concatenate([c.frames.reshape(-1) for c in clips]) if clips else EMPTY_FRAMES
    return flat, orjson.dumps(meta, option=orjson.OPT_SERIALIZE_NUMPY)


def frames_column(arrays: list[np.ndarray]) -> pa.Array:
    """A variable-length uint8 tensor column of ``arrays`` (1-D each), built with one copy
    (Ray's ``from_numpy`` goes through Python lists: seconds per 100 MB)."""
    from ray.data.extensions import ArrowVariableShapedTensorType

    sizes = np.fromiter((a.size for a in arrays), np.int64, len(arrays))
    offsets = np.zeros(len(arrays) + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    values = np.concatenate(arrays) if arrays else EMPTY_FRAMES
    data = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()),
                                         pa.array(values, type=pa.uint8()))
    shape = pa.array([[int(s)] for s in sizes], pa.list_(pa.int64()))
    storage = pa.StructArray.from_arrays([data, shape], names=["data", "shape"])
    return pa.ExtensionArray.from_storage(ArrowVariableShapedTensorType(pa.uint8(), 1), storage)


def column_arrays(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray]:
    """The 1-D uint8 arrays of a :func:`frames_column` (views of the block, no copy)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    out: list[np.ndarray] = []
    for chunk in chunks:
        out.extend(chunk.to_numpy() if len(chunk) else [])
    return out


def unpack_clips(flat: np.ndarray, meta_json: bytes) -> tuple[list[Clip], dict[str, Any]]:
    meta = orjson.loads(meta_json)
    clips, at = [], 0
    for c in meta["clips"]:
        shape = tuple(c["shape"])
        n = int(np.prod(shape))
        clips.append(Clip(
            frames=flat[at:at + n].reshape(shape), frame_indices=tuple(c["frame_indices"]),
            timestamps_s=tuple(c["timestamps_s"]), sample_fps=c["sample_fps"],
            facts=VideoFacts(**c["facts"]), start_s=c["start_s"], end_s=c["end_s"],
            window_index=c["window_index"], extra=c["extra"]))
        at += n
    return clips, meta


def pack_error(error: CaptionflowError) -> bytes:
    return orjson.dumps({"class": type(error).__name__, "code": error.code.value,
                         "message": error.message})


def unpack_error(data: bytes) -> CaptionflowError:
    """The CPU stage's error, as the class it was, not retriable: the CPU stage already
    spent this row's attempts (``worker.max_attempts``) on it."""
    info = orjson.loads(data)
    cls = getattr(errors, info["class"], None)
    if not (isinstance(cls, type) and issubclass(cls, CaptionflowError)):
        cls = EventError
    return cls(info["message"], code=ErrorCode(info["code"]), retriable=False)


class DecodedClips:
    """The clips of one row as the CPU stage decoded them (a ClipStream)."""

    def __init__(self, clips: list[Clip], meta: dict[str, Any]) -> None:
        self._clips = clips
        self._meta = meta

    @property
    def count(self) -> int:
        return len(self._clips)

    @property
    def fetch_decode_s(self) -> float:
        return float(self._meta["fetch_decode_s"])

    async def clip(self, index: int) -> Clip:
        return self._clips[index]

    async def content_validator(self) -> str | None:
        return self._meta["validator"]

    def clip_identity(self, index: int) -> dict[str, Any]:
        return self._meta["clips"][index]["identity"]

    def planned_clip(self, index: int) -> Clip:
        """The clip without its pixels: a caption from the cache describes it."""
        clip = self._clips[index].without_frames()
        clip.extra["cached"] = True
        return clip

    async def aclose(self) -> None:
        self._clips = []
