"""Destinations: where finished files go, resolved from ``--to`` by its scheme.

A store's :meth:`Store.put` makes one file visible under its final name all at once or
not at all: readers never see part of a file. Every failure to write is an
:class:`~captionflow.errors.ObjectStoreUnavailableError` (a dependency outage: the sink
pauses and retries, it never drops the rows).
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

from captionflow.config import Settings
from captionflow.errors import ConfigError

# scheme -> "module:class"; each module is imported only when its scheme is used.
_STORES = {
    "file": "captionflow.sink.local_store:LocalStore",
    "s3": "captionflow.sink.s3_store:S3Store",
}


class Store(Protocol):
    url: str

    def put(self, key: str, body: bytes) -> None:
        """Write ``body`` under ``key`` (relative to the destination), atomically."""

    def probe(self) -> bool:
        """Whether the destination answers and can be written (cheap; for /readyz)."""

    def clean_temporary(self, dataset: str, prefix: str) -> int:
        """Remove leftovers of interrupted writes whose names start with ``prefix``."""


def open_store(url: str, settings: Settings) -> Any:
    """The store for ``url``: ``s3://bucket/prefix/`` or a local directory (a path or
    ``file://``)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else "file"
    target = _STORES.get(scheme)
    if target is None:
        raise ConfigError(f"sink destination {url!r}: unknown scheme {scheme!r}; use a "
                          "local directory or s3://bucket/prefix/")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls).from_url(url, settings)
