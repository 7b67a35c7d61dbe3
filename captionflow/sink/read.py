"""Reading a sink's dataset back as one table, every file's columns unified.

A reader that takes its schema from one file (pyarrow.dataset's default) misses a column
that only later files have; this one inspects every file and promotes types where they
differ (a column absent from a file reads as null there). Temporary files (``_tmp/``) and
other names starting with ``_`` or ``.`` are skipped, as Hive readers do.
"""

from __future__ import annotations

from typing import Any

import pyarrow.dataset as ds
import pyarrow.fs as pafs


def open_dataset(path: str, *, filesystem: pafs.FileSystem | None = None,
                 format: str = "parquet") -> ds.Dataset:
    """The dataset under ``path`` (a local directory, or ``bucket/prefix`` with an S3
    ``filesystem``), with Hive folders as columns."""
    if filesystem is None:
        filesystem, path = pafs.FileSystem.from_uri(path) if "://" in path else (
            pafs.LocalFileSystem(), path)
    path = path.rstrip("/")
    file_format: Any = ds.ParquetFileFormat() if format == "parquet" else ds.JsonFileFormat()
    factory = ds.FileSystemDatasetFactory(
        filesystem, pafs.FileSelector(path, recursive=True), file_format,
        ds.FileSystemFactoryOptions(
            partition_base_dir=path,
            partitioning=ds.HivePartitioning.discover(),
            selector_ignore_prefixes=["_", "."]))
    return factory.finish(factory.inspect(promote_options="permissive"))
