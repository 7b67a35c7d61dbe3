"""Turn what a user points at (files, folders, globs, DataFlow JSON/JSONL) into VideoEvents.

Every candidate is validated here, before anything is sent; rejects carry the reason.
"""

from __future__ import annotations

import glob
import hashlib
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

from captionflow.config import VideoSettings
from captionflow.errors import CaptionflowError, SchemaInvalidError
from captionflow.schemas.codec import validate
from captionflow.schemas.events import VideoEvent

VIDEO_SUFFIXES = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ts", ".mpg", ".mpeg", ".flv", ".wmv",
     ".3gp", ".ogv", ".gif"})
URL_PREFIXES = ("http://", "https://", "file://", "s3://", "gs://")
# Objects with these suffixes are not videos and are skipped without asking the store.
NON_VIDEO_SUFFIXES = frozenset(
    {".json", ".jsonl", ".txt", ".csv", ".tsv", ".md", ".parquet", ".jpg", ".jpeg", ".png",
     ".webp", ".srt", ".vtt", ".wav", ".mp3", ".aac", ".flac", ".m4a", ".zip", ".tar", ".gz"})
# Keys a DataFlow row may carry that map onto VideoEvent fields; others go into metadata.
EVENT_KEYS = frozenset(VideoEvent.model_fields) - {"schema_version"}

IdFrom = Literal["auto", "uuid", "path", "field"]


@dataclass(frozen=True, slots=True)
class Rejected:
    source: str
    reason: str


@dataclass(frozen=True, slots=True)
class Candidate:
    source: str  # where it came from, for messages: "rows.json[3]", "a.mp4"
    event: VideoEvent | None = None
    rejected: Rejected | None = None


def path_id(reference: str) -> str:
    """A stable id derived from the reference: republishing the same video gives the same id."""
    return "v-" + hashlib.sha256(reference.encode()).hexdigest()[:32]


def _new_id(reference: str | None, row: dict[str, Any] | None, id_from: IdFrom) -> str | None:
    row_id = row.get("id") if row else None
    if id_from == "field":
        return row_id if isinstance(row_id, str) and row_id else None
    if id_from == "path":
        return path_id(reference) if reference else None
    if id_from == "auto" and isinstance(row_id, str) and row_id:
        return row_id
    return uuid.uuid4().hex


def event_from_row(row: Any, *, source: str, id_from: IdFrom = "auto") -> Candidate:
    """A DataFlow row (``{"video": [...], "conversation": [...]}``) as a VideoEvent."""
    if not isinstance(row, dict):
        return Candidate(source, rejected=Rejected(source, "row is not a JSON object"))
    video = row.get("video")
    reference = video[0] if isinstance(video, list) and video else video
    event_id = _new_id(reference if isinstance(reference, str) else None, row, id_from)
    if event_id is None:
        why = "row has no string 'id'" if id_from == "field" else "row has no video reference"
        return Candidate(source, rejected=Rejected(source, why))
    data = {k: v for k, v in row.items() if k in EVENT_KEYS}
    extra = {k: v for k, v in row.items() if k not in EVENT_KEYS}
    if extra:
        data["metadata"] = {**extra, **(row.get("metadata") or {})}
    data["id"] = event_id
    try:
        return Candidate(source, event=validate(VideoEvent, data))
    except SchemaInvalidError as e:
        return Candidate(source, rejected=Rejected(source, e.message))


def event_from_path(reference: str, *, id_from: IdFrom = "auto") -> Candidate:
    if id_from == "field":
        return Candidate(reference, rejected=Rejected(
            reference, "--id-from field needs JSON rows with an 'id'; files have none"))
    return event_from_row({"video": [reference]}, source=reference,
                          id_from="path" if id_from == "path" else "uuid")


def _rows_of(path: Path) -> Iterator[tuple[str, Any]]:
    if path.suffix == ".jsonl":
        with path.open("rb") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield f"{path}:{n}", orjson.loads(line)
                    except orjson.JSONDecodeError as e:
                        yield f"{path}:{n}", _Bad(f"invalid JSON: {e}")
        return
    try:
        data = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as e:
        yield str(path), _Bad(f"invalid JSON: {e}")
        return
    rows = data if isinstance(data, list) else [data]
    for i, row in enumerate(rows):
        yield f"{path}[{i}]", row


@dataclass(frozen=True, slots=True)
class _Bad:
    reason: str


def expand(inputs: Iterable[str], *, id_from: IdFrom = "auto",
           video: VideoSettings | None = None) -> Iterator[Candidate]:
    """Yield one candidate per video or row, in input order.

    Local video files become absolute paths (workers resolve them against their allowed
    roots); values inside JSON rows are sent as written. ``s3://bucket/prefix/`` (ending in
    ``/``, or a bare bucket) lists the prefix with ``video``'s store settings.
    """
    for item in inputs:
        if is_s3_prefix(item):
            yield from s3_prefix_events(item, id_from=id_from, video=video or VideoSettings())
            continue
        if item.startswith(URL_PREFIXES):
            yield event_from_path(item, id_from=id_from)
            continue
        path = Path(item)
        if path.suffix in (".json", ".jsonl") and path.is_file():
            for source, row in _rows_of(path):
                if isinstance(row, _Bad):
                    yield Candidate(source, rejected=Rejected(source, row.reason))
                else:
                    yield event_from_row(row, source=source, id_from=id_from)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
            if not found:
                yield Candidate(item, rejected=Rejected(item, "no video files in directory"))
            for p in found:
                yield event_from_path(str(p.resolve()), id_from=id_from)
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                yield Candidate(item, rejected=Rejected(item, "pattern matched no files"))
            for m in matches:
                yield event_from_path(str(Path(m).resolve()), id_from=id_from)
        elif path.is_file():
            yield event_from_path(str(path.resolve()), id_from=id_from)
        else:
            yield Candidate(item, rejected=Rejected(item, "no such file or directory"))


def is_s3_prefix(item: str) -> bool:
    if not item.lower().startswith("s3://"):
        return False
    _, slash, key = item[5:].partition("/")
    return not slash or not key or key.endswith("/")


def s3_prefix_events(url: str, *, id_from: IdFrom, video: VideoSettings) -> Iterator[Candidate]:
    """One event per video object under ``url``: a video suffix, or (for keys with another
    or no suffix) a ``video/*`` content type. Ids derive from the key (``--id-from auto`` is
    ``path`` here), so publishing a prefix twice gives the same ids."""
    from captionflow.video.s3 import content_type, list_objects

    if id_from == "field":
        yield Candidate(url, rejected=Rejected(
            url, "--id-from field needs JSON rows with an 'id'; objects have none"))
        return
    bucket = url[5:].partition("/")[0]
    found = 0
    try:
        for key, _size in list_objects(url, video):
            suffix = Path(key).suffix.lower()
            if suffix not in VIDEO_SUFFIXES and (
                    suffix in NON_VIDEO_SUFFIXES or
                    not content_type(bucket, key, video).lower().startswith("video/")):
                continue
            found += 1
            yield event_from_row({"video": [f"s3://{bucket}/{key}"]}, source=url,
                                 id_from="uuid" if id_from == "uuid" else "path")
    except CaptionflowError as e:
        yield Candidate(url, rejected=Rejected(url, reject_reason(e)))
        return
    if not found:
        yield Candidate(url, rejected=Rejected(url, "no video objects under this prefix"))


def reject_reason(error: CaptionflowError) -> str:
    return f"{error.code}: {error.message}"
