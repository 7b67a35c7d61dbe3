"""DataFlow row files: read a JSON list, JSONL, CSV or parquet file, write one atomically,
and name the step files the way DataFlow's ``FileStorage`` does
(``{cache_path}/{prefix}_step{N}.{ext}``).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

from captionflow.batch.remote import read_remote, remote_url, write_remote
from captionflow.batch.tabular import decode_csv, decode_parquet, encode_csv, encode_parquet
from captionflow.config import VideoSettings
from captionflow.errors import ConfigError, ErrorCode, SchemaInvalidError

CacheType = Literal["json", "jsonl", "csv", "parquet"]
CACHE_TYPES: tuple[CacheType, ...] = ("json", "jsonl", "csv", "parquet")


@dataclass(frozen=True, slots=True)
class UnparsableLine:
    """A JSONL line that is not JSON: it becomes a failed row, the run goes on."""

    line_no: int
    text: str
    reason: str

    def as_row(self) -> dict[str, Any]:
        return {"line": self.text, "error": {"code": ErrorCode.MALFORMED_JSON.value,
                                             "message": self.reason}}


def cache_type_of(path: str | Path) -> CacheType:
    """The file type its suffix names (``.jsonl``, ``.csv``, ``.parquet``); JSON otherwise."""
    suffix = Path(path).suffix.lower().lstrip(".")
    return suffix if suffix in ("jsonl", "csv", "parquet") else "json"  # type: ignore[return-value]


def check_cache_type(cache_type: str) -> CacheType:
    if cache_type not in CACHE_TYPES:
        raise ConfigError(
            f"cache_type {cache_type!r} is not supported: use one of {', '.join(CACHE_TYPES)}")
    return cache_type  # type: ignore[return-value]


def step_path(cache_path: str | Path, prefix: str, step: int, cache_type: str) -> Path:
    """Where DataFlow's FileStorage keeps the output of operator step ``step`` (>= 1)."""
    if step < 1:
        raise ConfigError(f"step {step} has no cache file; step 0 is the first entry file")
    return Path(cache_path) / f"{prefix}_step{step}.{check_cache_type(cache_type)}"


def read_rows(path: str | Path, *, video: VideoSettings | None = None) -> list[Any]:
    """Every row of a DataFlow file, in order. A JSON file holds a list of rows (a single
    object counts as one row); a JSONL file one row per non-blank line, where a line that is
    not JSON becomes an :class:`UnparsableLine`; a CSV or parquet file one row per record
    (see :mod:`captionflow.batch.tabular`). ``path`` may be ``s3://bucket/key`` (read with
    ``video``'s S3 settings). Raises ConfigError when the file cannot be read and
    SchemaInvalidError when it is not of its type at all."""
    url = remote_url(path)
    if url is not None:
        remote = read_remote(url, video)
        if remote is None:
            raise ConfigError(f"cannot read {url}: no such object")
        data = remote
        path = Path(url.rsplit("/", 1)[-1])
    else:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read the input file {path}: {e.strerror or e}") from e
    kind = cache_type_of(path)
    if kind == "csv":
        return decode_csv(data, str(path))
    if kind == "parquet":
        return decode_parquet(data, str(path))
    if kind == "jsonl":
        rows: list[Any] = []
        for n, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(orjson.loads(line))
            except orjson.JSONDecodeError as e:
                rows.append(UnparsableLine(n, line.decode("utf-8", "replace"),
                                           f"{path}:{n} is not JSON: {e}"))
        return rows
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise SchemaInvalidError(
            f"{path} is not JSON ({e}); DataFlow JSON files hold a list of rows, JSONL files "
            "(suffix .jsonl) one row per line") from e
    return parsed if isinstance(parsed, list) else [parsed]


def encode_rows(rows: list[Any], cache_type: CacheType) -> bytes:
    if cache_type == "csv":
        return encode_csv(rows)
    if cache_type == "parquet":
        return encode_parquet(rows)
    if cache_type == "jsonl":
        return b"".join(orjson.dumps(row) + b"\n" for row in rows)
    return orjson.dumps(rows, option=orjson.OPT_INDENT_2) + b"\n"


def write_rows(path: str | Path, rows: list[Any], cache_type: CacheType, *,
               video: VideoSettings | None = None) -> Path | str:
    """Replace ``path`` with ``rows`` in one rename (in S3: one completed upload), so an
    interrupted run leaves either the previous checkpoint or the new one, never half a
    file. Returns the path, or the ``s3://`` URL."""
    url = remote_url(path)
    if url is not None:
        write_remote(url, encode_rows(rows, cache_type), video)
        return url
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(encode_rows(rows, cache_type))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
