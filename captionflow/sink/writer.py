"""The rows of one roll as files in a store: group by folder, encode, name, put.

One writer per dataset. Encoding happens once per roll; a write that fails is retried with
the same bytes under the same names, so a retry and a rerun after a crash write the same
files (docs/sink.md). The batch mode uses the same writer for ``s3://`` outputs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from captionflow.config import Settings
from captionflow.schemas.events import CaptionEvent, DeadLetterEvent
from captionflow.sink.formats import FileFormat, Row, file_format
from captionflow.sink.layout import DATASETS, EVENT_DATE, KAFKA_PARTITION, FileName, Layout
from captionflow.sink.schema import EventSchema, model_column
from captionflow.sink.stores import Store

log = logging.getLogger(__name__)


@dataclass(slots=True)
class PendingFile:
    key: str
    body: bytes
    rows: int


@dataclass(slots=True)
class Encoded:
    files: list[PendingFile]
    rejected: int


class DatasetWriter:
    def __init__(self, store: Store, *, layout: Layout, file_format: FileFormat,
                 schema: EventSchema) -> None:
        self.store = store
        self.layout = layout
        self.format = file_format
        self.schema = schema

    @property
    def dataset(self) -> str:
        return self.layout.dataset

    def encode(self, topic: str, partition: int,
               folders: Iterable[tuple[str, list[Row]]]) -> Encoded:
        """One file per folder, named by the folder's first offset."""
        files, rejected = [], 0
        for folder, rows in folders:
            if not rows:
                continue
            name = FileName(topic, partition, rows[0].offset, self.format.extension)
            encoded = self.format.encode(rows, self.schema)
            for row, why in encoded.rejected:
                rejected += 1
                log.error("%s[%d]@%d (event %s) does not fit the dataset's columns (%s); "
                          "left out", topic, partition, row.offset, row.data.get("id"), why)
            if encoded.rows:
                files.append(PendingFile(self.layout.key(folder, name), encoded.body,
                                         encoded.rows))
        return Encoded(files, rejected)

    def put(self, file: PendingFile) -> float:
        """Write one file; return the seconds it took."""
        started = time.monotonic()
        self.store.put(file.key, file.body)
        return time.monotonic() - started


def build_writers(settings: Settings, store: Store) -> dict[str, DatasetWriter]:
    """topic -> the writer of its dataset."""
    s, t = settings.sink, settings.topics
    fmt = file_format(s.format, parquet_compression=s.parquet_compression)
    wanted = {t.output: (DATASETS["output"], CaptionEvent)}
    if s.dead_letter:
        wanted[t.dead_letter] = (DATASETS["dead_letter"], DeadLetterEvent)
    writers = {}
    for topic, (dataset, model) in wanted.items():
        known = {name for name, _ in model_column(model).children}
        partition_by = s.partition_by
        if model is DeadLetterEvent:
            # Folders by a caption field (model, status) mean nothing for a dead letter.
            partition_by = tuple(n for n in partition_by
                                 if n in (KAFKA_PARTITION, EVENT_DATE) or n in known) \
                or (KAFKA_PARTITION,)
        layout = Layout(dataset, partition_by, known_fields=known)
        schema = EventSchema(model, drop=layout.fields if fmt.drops_partition_fields else ())
        writers[topic] = DatasetWriter(store, layout=layout, file_format=fmt, schema=schema)
    return writers
