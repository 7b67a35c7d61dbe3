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

from captionflow.errors import CaptionflowError, SchemaInvalidError
from captionflow.schemas.codec import validate
from captionflow.schemas.events import VideoEvent

VIDEO_SUFFIXES = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ts", ".mpg", ".mpeg", ".flv", ".wmv",
     ".3gp", ".ogv", ".gif"})
URL_PREFIXES = ("http://", "https://", "file://", "s3://", "gs://")
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


def expand(inputs: Iterable[str], *, id_from: IdFrom = "auto") -> Iterator[Candidate]:
    """Yield one candidate per video or row, in input order.

    Local video files become absolute paths (workers resolve them against their allowed
    roots); values inside JSON rows are sent as written.
    """
    for item in inputs:
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


def reject_reason(error: CaptionflowError) -> str:
    return f"{error.code}: {error.message}"
