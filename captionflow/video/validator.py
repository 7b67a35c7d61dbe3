"""A video's content validator: a string equal for equal bytes and different when they
change, for the caption cache's key (captionflow/cache/key.py).

- A local file or a download (read whole anyway): ``sha256:<digest of the bytes>``.
- An object read in ranges (``s3://``, where hashing would mean reading every byte):
  ``s3-etag:<ETag>:<size>:<version id>``. Equal bytes under two keys share an ETag only
  for single-part uploads; a multipart upload's ETag depends on its part size too, so
  such copies are different work to the cache (correct, not shared).
- Any other ranged source: None (no validator, no caching).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

_CHUNK_BYTES = 1 << 20


def file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def content_validator(video: Any) -> str | None:
    """``video`` is what ``fetch`` returned: a ``LocalVideo`` or a ``RemoteVideo``."""
    path = getattr(video, "path", None)
    if isinstance(path, Path):
        return file_digest(path)
    etag = getattr(video, "etag", None)
    if etag:
        version = getattr(video, "version_id", None) or ""
        return f"s3-etag:{etag}:{video.size_bytes}:{version}"
    return None
