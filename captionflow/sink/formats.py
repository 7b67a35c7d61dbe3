"""File formats: the rows of one file as the bytes of that file.

Parquet (pyarrow) holds typed columns (:mod:`captionflow.sink.schema`); JSONL holds each
record's value exactly as it was on the topic, one per line, optionally gzipped. Each
format is registered under the name ``sink.format`` uses.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from captionflow.sink.schema import EventSchema


@dataclass(frozen=True, slots=True)
class Row:
    """One record: its offset, its value as consumed, and that value parsed."""

    offset: int
    raw: bytes
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Encoded:
    body: bytes
    rows: int
    # Rows that could not be encoded (a value of the wrong type for its column), and why.
    rejected: tuple[tuple[Row, str], ...] = ()


Encoder = Callable[[Sequence[Row], EventSchema], Encoded]


@dataclass(frozen=True, slots=True)
class FileFormat:
    name: str
    extension: str
    encode: Encoder
    # Whether a top-level field used for a Hive folder is left out of the rows (Parquet:
    # the folder is the column; JSONL keeps each record as it was).
    drops_partition_fields: bool


def _parquet(compression: str) -> Encoder:
    codec = None if compression == "none" else compression

    def encode(rows: Sequence[Row], schema: EventSchema) -> Encoded:
        table, rejected = _table(rows, schema)
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression=codec)
        return Encoded(buffer.getvalue(), table.num_rows, rejected)

    return encode


_ARROW_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError)


def _table(rows: Sequence[Row], schema: EventSchema
           ) -> tuple[pa.Table, tuple[tuple[Row, str], ...]]:
    try:
        return schema.table([r.data for r in rows]), ()
    except _ARROW_ERRORS:
        pass
    # Rare: some value does not fit its column. Find those rows one by one; the others land.
    kept, rejected = [], []
    for row in rows:
        try:
            schema.table([row.data])
        except _ARROW_ERRORS as e:
            rejected.append((row, str(e)))
        else:
            kept.append(row.data)
    return schema.table(kept), tuple(rejected)


def _jsonl(compress: bool) -> Encoder:
    def encode(rows: Sequence[Row], schema: EventSchema) -> Encoded:
        body = b"".join(r.raw.rstrip(b"\n") + b"\n" for r in rows)
        if compress:
            # mtime 0: the same rows give the same bytes, so a rewrite is byte-identical.
            body = gzip.compress(body, compresslevel=6, mtime=0)
        return Encoded(body, len(rows))

    return encode


def file_format(name: str, *, parquet_compression: str = "zstd") -> FileFormat:
    if name == "parquet":
        return FileFormat("parquet", "parquet", _parquet(parquet_compression), True)
    if name == "jsonl":
        return FileFormat("jsonl", "jsonl", _jsonl(False), False)
    if name == "jsonl.gz":
        return FileFormat("jsonl.gz", "jsonl.gz", _jsonl(True), False)
    raise ValueError(f"unknown sink format {name!r}: parquet, jsonl or jsonl.gz")
