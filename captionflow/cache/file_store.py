"""The default store: one file per entry under a directory (one machine, no server).

A write goes to a temporary file in the same directory, then ``os.replace`` puts it in
place: a reader sees the whole entry or none, also across processes and after a crash."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

from captionflow.cache.stores import object_name
from captionflow.config import CacheSettings, VideoSettings
from captionflow.errors import CacheUnavailableError


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "captionflow" / "captions"


class FileStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = root.as_uri()

    def get(self, key: str) -> bytes | None:
        try:
            return (self.root / object_name(key)).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise CacheUnavailableError(f"reading cache entry {key} under {self.root}: {e}") \
                from e

    def put(self, key: str, value: bytes) -> None:
        path = self.root / object_name(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(value)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as e:
            raise CacheUnavailableError(f"writing cache entry {key} under {self.root}: {e}") \
                from e


def open_file_store(url: str, settings: CacheSettings, video: VideoSettings) -> FileStore:
    if not url:
        return FileStore(default_dir())
    if url.lower().startswith("file://"):
        parts = urlsplit(url)
        return FileStore(Path(unquote(parts.path)))
    return FileStore(Path(url).expanduser())
