"""A local (or mounted network) directory as the destination.

A file is written under ``DATASET/_tmp/`` (pyarrow.dataset, Spark and DuckDB's Hive
readers skip names starting with ``_``), flushed to disk, then renamed onto its final
name, and the folder is synced: the rename is atomic on one file system, so a reader sees
the old file, or no file, or the whole new one.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from captionflow.config import Settings
from captionflow.errors import ConfigError, ObjectStoreUnavailableError

TMP_DIR = "_tmp"


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = str(root)

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> LocalStore:
        path = url[len("file://"):] if url.lower().startswith("file://") else url
        root = Path(path).expanduser().resolve()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"sink destination {root} cannot be created: {e}") from e
        if not os.access(root, os.W_OK | os.X_OK):
            raise ConfigError(f"sink destination {root} is not writable by this user")
        return cls(root)

    def put(self, key: str, body: bytes) -> None:
        final = self.root / key
        dataset = key.split("/", 1)[0]
        tmp_dir = self.root / dataset / TMP_DIR
        tmp = tmp_dir / f"{final.name}.{uuid.uuid4().hex}.tmp"
        try:
            tmp_dir.mkdir(parents=True, exist_ok=True)
            final.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            _sync_dir(final.parent)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise ObjectStoreUnavailableError(
                f"writing {final} failed ({e}); check free space and permissions") from e

    def probe(self) -> bool:
        return self.root.is_dir() and os.access(self.root, os.W_OK | os.X_OK)

    def clean_temporary(self, dataset: str, prefix: str) -> int:
        removed = 0
        tmp_dir = self.root / dataset / TMP_DIR
        if tmp_dir.is_dir():
            for path in tmp_dir.glob(f"{prefix}*"):
                path.unlink(missing_ok=True)
                removed += 1
        return removed


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
