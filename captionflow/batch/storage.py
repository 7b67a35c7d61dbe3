"""DataFlow's ``FileStorage``: step 0 reads the first entry file, step N reads the cache
file of step N and writes that of step N+1 (``{cache_path}/{prefix}_step{N}.{ext}``). The
cache path (and the first entry file) may be ``s3://bucket/prefix``: the files are then
objects, written whole (:mod:`captionflow.batch.remote`) with the S3 settings of the
environment (``CAPTIONFLOW_VIDEO__S3_*``, ``AWS_*``)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from captionflow.batch.files import check_cache_type, read_rows, step_path, write_rows
from captionflow.batch.remote import remote_url
from captionflow.errors import ConfigError


class FileStorage:
    def __init__(self, first_entry_file_name: str, cache_path: str = "./cache",
                 file_name_prefix: str = "dataflow_cache_step",
                 cache_type: str = "json") -> None:
        self.first_entry_file_name = first_entry_file_name
        self.cache_path = cache_path
        self.file_name_prefix = file_name_prefix
        self.cache_type = check_cache_type(cache_type)
        self.operator_step = -1

    def step(self) -> FileStorage:
        """Advance to the next operator and hand it a copy bound to that step."""
        self.operator_step += 1
        return copy.copy(self)

    def reset(self) -> FileStorage:
        self.operator_step = -1
        return self

    def _file_of(self, step: int) -> Path | str:
        """The step's file: a path, or an ``s3://`` URL when the cache path is one."""
        if step < 0:
            raise ConfigError("FileStorage has no current step: pass storage.step() to the "
                              "operator, not the storage itself")
        if step == 0:
            return remote_url(self.first_entry_file_name) or Path(self.first_entry_file_name)
        path = step_path(self.cache_path, self.file_name_prefix, step, self.cache_type)
        return remote_url(path) or path

    @property
    def read_path(self) -> Path | str:
        return self._file_of(self.operator_step)

    @property
    def write_path(self) -> Path | str:
        return self._file_of(self.operator_step + 1)

    def read(self, output_type: Literal["dict", "dataframe"] = "dict") -> Any:
        """The current step's rows: a list of dicts, or a pandas DataFrame (pandas must be
        installed; captionflow does not need it)."""
        rows = read_rows(self.read_path)
        if output_type == "dataframe":
            import pandas as pd
            return pd.DataFrame(rows)
        return rows

    def write(self, data: Any) -> str:
        """Write rows (a list, or a DataFrame) as the next step's file; returns its path."""
        rows = data.to_dict(orient="records") if hasattr(data, "to_dict") else list(data)
        return str(write_rows(self.write_path, rows, self.cache_type))
