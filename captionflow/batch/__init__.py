"""Batch mode: caption DataFlow JSON/JSONL rows with the worker's frames and serving code
(``captionflow run``, and the DataFlow-style API in :mod:`captionflow.dataflow`)."""

from captionflow.batch.files import read_rows, step_path, write_rows
from captionflow.batch.job import run_file
from captionflow.batch.rows import RowKeys, already_captioned
from captionflow.batch.runner import BatchReport, caption_rows
from captionflow.batch.storage import FileStorage

__all__ = [
    "BatchReport", "FileStorage", "RowKeys", "already_captioned",
    "caption_rows", "read_rows", "run_file", "step_path", "write_rows",
]
