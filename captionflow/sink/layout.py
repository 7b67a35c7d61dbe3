"""Where each record goes: the dataset folder, its Hive-style partition folders, and a file
name fixed by what the file holds.

``captions/partition=3/captionflow.captions+3+000000012345.parquet`` holds records of
partition 3 of topic ``captionflow.captions`` from offset 12345 on. A rerun from that
offset writes the same name, which is what makes the dataset exactly once (docs/sink.md).
Folders are ``NAME=value`` with the value percent-encoded, as Hive, Spark, DuckDB and
pyarrow.dataset read them; a missing value is ``__HIVE_DEFAULT_PARTITION__``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from captionflow.errors import ConfigError

# Folder levels that are not fields of the event.
KAFKA_PARTITION = "partition"
EVENT_DATE = "date"
NULL_FOLDER_VALUE = "__HIVE_DEFAULT_PARTITION__"
OFFSET_DIGITS = 12
# Dataset folders of the two topics the sink reads.
DATASETS = {"output": "captions", "dead_letter": "dead_letter"}
_NAME = re.compile(r"^(?P<topic>.+)\+(?P<partition>\d+)\+(?P<offset>\d{%d,})\.(?P<ext>.+)$"
                   % OFFSET_DIGITS)


@dataclass(frozen=True, slots=True)
class FileName:
    topic: str
    partition: int
    offset: int
    extension: str

    def __str__(self) -> str:
        return f"{self.topic}+{self.partition}+{self.offset:0{OFFSET_DIGITS}d}.{self.extension}"

    @classmethod
    def parse(cls, name: str) -> FileName | None:
        m = _NAME.match(name.rsplit("/", 1)[-1])
        if m is None:
            return None
        return cls(m["topic"], int(m["partition"]), int(m["offset"]), m["ext"])


class Layout:
    """Folders by ``partition_by`` (outermost first) under one dataset folder."""

    def __init__(self, dataset: str, partition_by: tuple[str, ...], *,
                 known_fields: set[str]) -> None:
        for name in partition_by:
            if name in (KAFKA_PARTITION, EVENT_DATE):
                continue
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ConfigError(f"sink.partition_by: {name!r} is not a field name")
            if name not in known_fields:
                raise ConfigError(
                    f"sink.partition_by: the events have no top-level field {name!r}; use "
                    f"{KAFKA_PARTITION!r}, {EVENT_DATE!r} or one of "
                    f"{', '.join(sorted(known_fields))}")
        self.dataset = dataset
        self.partition_by = partition_by
        # Fields of the event that become folders (left out of Parquet rows).
        self.fields = tuple(n for n in partition_by if n not in (KAFKA_PARTITION, EVENT_DATE))
        self._only_kafka_partition = partition_by == (KAFKA_PARTITION,)

    def folder(self, partition: int, data: dict[str, Any]) -> str:
        if self._only_kafka_partition:
            return f"{KAFKA_PARTITION}={partition}"
        parts = []
        for name in self.partition_by:
            if name == KAFKA_PARTITION:
                value: Any = partition
            elif name == EVENT_DATE:
                created = data.get("created_at")
                value = created[:10] if isinstance(created, str) and len(created) >= 10 \
                    else None
            else:
                value = data.get(name)
            parts.append(f"{name}={_folder_value(value)}")
        return "/".join(parts)

    def key(self, folder: str, name: FileName) -> str:
        return f"{self.dataset}/{folder}/{name}"


@functools.lru_cache(maxsize=4096)
def _quoted(text: str) -> str:
    return quote(text, safe="-_.~ @:,+")


def _folder_value(value: Any) -> str:
    if value is None or value == "":
        return NULL_FOLDER_VALUE
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (dict, list)):
        return NULL_FOLDER_VALUE  # not a folder value; the row keeps it (JSONL) or loses it
    else:
        text = str(value)
    return _quoted(text)
