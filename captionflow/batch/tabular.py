"""DataFlow rows as CSV and parquet, as DataFlow's ``FileStorage`` writes them
(``cache_type="csv"|"parquet"``), so that every row comes back as it was written.

Rows are dicts whose keys become columns. A row without some column keeps that cell absent
(not null) on the way back. CSV: a string cell is written as it is unless it would read back
as JSON (``"42"``, ``"[1]"``, ``""``), then it is JSON-quoted; every other value (number,
bool, null, list, dict) is written as JSON; an absent cell is empty. Parquet (pyarrow): a
column keeps its native Arrow type (list, struct, string, ...) when its values come back
unchanged from it; otherwise (mixed kinds, dicts with differing keys) it is stored as JSON
text, and the file's metadata names those columns and the absent cells.
"""

from __future__ import annotations

import csv
import io
from typing import Any

import orjson

from captionflow.errors import SchemaInvalidError

_META_KEY = b"captionflow"


def _columns(rows: list[Any], what: str) -> list[str]:
    names: dict[str, None] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise SchemaInvalidError(f"{what} rows must be JSON objects; row {i} is "
                                     f"{type(row).__name__}")
        for key in row:
            names.setdefault(str(key), None)
    return list(names)


# --- csv ----------------------------------------------------------------------------------


def _reads_as_json(text: str) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return True


def _csv_cell(value: Any) -> str:
    if isinstance(value, str):
        return orjson.dumps(value).decode() if value == "" or _reads_as_json(value) else value
    return orjson.dumps(value).decode()


def encode_csv(rows: list[Any]) -> bytes:
    columns = _columns(rows, "csv")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if name not in row else _csv_cell(row[name]) for name in columns])
    return out.getvalue().encode()


def decode_csv(data: bytes, source: str) -> list[dict[str, Any]]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SchemaInvalidError(f"{source} is not UTF-8 text: {e}") from e
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        rows = []
        for cells in reader:
            if not cells:
                continue
            row: dict[str, Any] = {}
            for name, cell in zip(header or [], cells, strict=False):
                if cell == "":
                    continue  # absent
                try:
                    row[name] = orjson.loads(cell)
                except orjson.JSONDecodeError:
                    row[name] = cell
            rows.append(row)
    except csv.Error as e:
        raise SchemaInvalidError(f"{source} is not CSV: {e}") from e
    return rows


# --- parquet ------------------------------------------------------------------------------


def encode_parquet(rows: list[Any]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = _columns(rows, "parquet")
    arrays, json_columns, absent = [], [], {}
    for name in columns:
        values = [row.get(name) for row in rows]
        missing = [i for i, row in enumerate(rows) if name not in row]
        if missing:
            absent[name] = missing
        array = _native(values)
        if array is None:
            json_columns.append(name)
            array = pa.array([None if v is None else orjson.dumps(v).decode() for v in values],
                             type=pa.string())
        arrays.append(array)
    table = pa.Table.from_arrays(arrays, names=columns) if columns else pa.table({})
    meta = {"json_columns": json_columns, "absent": absent, "rows": len(rows)}
    table = table.replace_schema_metadata({_META_KEY: orjson.dumps(meta)})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _native(values: list[Any]) -> Any:
    """An Arrow array that gives ``values`` back unchanged, or None."""
    import pyarrow as pa

    try:
        array = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
        return None
    if pa.types.is_null(array.type) and any(v is not None for v in values):
        return None
    return array if array.to_pylist() == values else None


def decode_parquet(data: bytes, source: str) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        raise SchemaInvalidError(f"{source} is not a parquet file: {e}") from e
    meta = orjson.loads((table.schema.metadata or {}).get(_META_KEY, b"{}"))
    json_columns = set(meta.get("json_columns", ()))
    absent = {name: set(rows) for name, rows in meta.get("absent", {}).items()}
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    count = table.num_rows if columns else int(meta.get("rows", 0))
    rows = []
    for i in range(count):
        row: dict[str, Any] = {}
        for name, values in columns.items():
            if i in absent.get(name, ()):
                continue
            value = values[i]
            if name in json_columns and value is not None:
                value = orjson.loads(value)
            row[name] = value
        rows.append(row)
    return rows
