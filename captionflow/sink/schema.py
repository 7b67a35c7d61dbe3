"""Events as Arrow rows: the columns and their types come from the event models.

Every top-level field of an event is a column. Its Arrow type follows the pydantic model
(:class:`~captionflow.schemas.events.CaptionEvent`, :class:`DeadLetterEvent`): strings,
integers, floats and booleans as themselves, nested models as structs, lists as lists,
``dict[str, str]`` as maps. Values whose shape the model does not fix (``Any``,
``dict[str, Any]``: ``caption_json``, ``metadata``) are JSON text, since one Arrow type
cannot hold every JSON value. The types never depend on the values, so every file of a
dataset agrees on them.

A field the model does not know (written by a newer worker) still becomes a column of the
files that hold it: string, boolean, integer or float by its values, JSON text otherwise.
Readers unify such files with the older ones (docs/sink.md: a column absent from a file
reads as null there).
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

import orjson
import pyarrow as pa
from pydantic import BaseModel


@dataclass(frozen=True, slots=True)
class Column:
    """How one value is turned into Arrow: ``kind`` is scalar, json, struct, list or map."""

    type: pa.DataType
    kind: str = "scalar"
    children: tuple[tuple[str, Column], ...] = ()  # struct fields
    item: Column | None = None  # list items, map values
    # Whether anything below needs converting (JSON text); if not, values pass as they are.
    converts: bool = False


JSON = Column(pa.string(), "json", converts=True)


def _column(annotation: Any) -> Column:
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        if len(args) == 1:
            return _column(args[0])
        return JSON
    if origin is typing.Annotated:
        return _column(args[0])
    if origin is Literal:
        kinds = {type(a) for a in args}
        return _column(kinds.pop()) if len(kinds) == 1 else JSON
    if origin in (list, tuple, set, frozenset):
        if origin is tuple and (len(args) != 2 or args[1] is not Ellipsis):
            return JSON
        item = _column(args[0]) if args else JSON
        return Column(pa.list_(item.type), "list", item=item, converts=item.converts)
    if origin is dict:
        key, value = (args + [Any, Any])[:2]
        item = _column(value)
        if key is not str or item.kind == "json":
            return JSON
        return Column(pa.map_(pa.string(), item.type), "map", item=item,
                      converts=item.converts)
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return model_column(annotation)
        if issubclass(annotation, bool):
            return Column(pa.bool_())
        if issubclass(annotation, Enum):
            return Column(pa.string())
        if issubclass(annotation, str):
            return Column(pa.string())
        if issubclass(annotation, int):
            return Column(pa.int64())
        if issubclass(annotation, float):
            return Column(pa.float64())
    return JSON


def model_column(model: type[BaseModel]) -> Column:
    children = tuple((field.alias or name, _column(field.annotation))
                     for name, field in model.model_fields.items())
    return Column(pa.struct([pa.field(n, c.type) for n, c in children]), "struct",
                  children=children, converts=any(c.converts for _, c in children))


def _convert(value: Any, column: Column) -> Any:
    if value is None or not column.converts:
        return value
    if column.kind == "json":
        return orjson.dumps(value).decode()
    if column.kind == "struct":
        if not isinstance(value, dict):
            return value
        out = dict(value)
        for name, child in column.children:
            if child.converts and name in out:
                out[name] = _convert(out[name], child)
        return out
    if column.kind == "list" and isinstance(value, list):
        assert column.item is not None
        return [_convert(v, column.item) for v in value]
    if column.kind == "map" and isinstance(value, dict):
        assert column.item is not None
        return {k: _convert(v, column.item) for k, v in value.items()}
    return value


def _scalar_type(values: Iterable[Any]) -> Column:
    kinds = {type(v) for v in values if v is not None}
    if not kinds:
        return Column(pa.null())
    if kinds == {bool}:
        return Column(pa.bool_())
    if kinds == {str}:
        return Column(pa.string())
    if kinds == {int}:
        return Column(pa.int64())
    if kinds <= {int, float}:
        return Column(pa.float64())
    return JSON


class EventSchema:
    """The Arrow schema of one event model, and the rows of one file turned into a table."""

    def __init__(self, model: type[BaseModel], *, drop: Iterable[str] = ()) -> None:
        self.model = model
        dropped = set(drop)
        self.columns = tuple((name, column) for name, column in model_column(model).children
                             if name not in dropped)
        self._known = {name for name, _ in model_column(model).children}
        self._drop = dropped
        self.schema = pa.schema([pa.field(name, c.type) for name, c in self.columns])

    def table(self, rows: list[dict[str, Any]]) -> pa.Table:
        """The rows as one table: the model's columns, then unknown fields in the order
        they first appear."""
        extra: dict[str, None] = {}
        for row in rows:
            for name in row:
                if name not in self._known and name not in self._drop:
                    extra.setdefault(name)
        arrays = []
        fields = []
        for name, column in self.columns:
            if column.converts:
                values = [_convert(row.get(name), column) for row in rows]
            else:
                values = [row.get(name) for row in rows]
            arrays.append(pa.array(values, type=column.type))
            fields.append(pa.field(name, column.type))
        for name in extra:
            raw = [row.get(name) for row in rows]
            column = _scalar_type(raw)
            values = [_convert(v, column) for v in raw]
            arrays.append(pa.array(values, type=column.type))
            fields.append(pa.field(name, column.type))
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields))
