"""Cache stores by URL scheme, each in its own module, imported only when named.

A store maps a key (64 hex digits) to the bytes of one entry. Entries are immutable (a key
names the work, so an entry never changes): a store needs no locking, and a second write
of the same key by another worker writes the same caption. Both calls are synchronous and
may block; :class:`captionflow.cache.cache.CaptionCache` runs them off the event loop and
bounds them with ``cache.timeout_ms``. They raise
:class:`captionflow.errors.CacheUnavailableError` when the store fails.
"""

from __future__ import annotations

import importlib
from typing import Protocol

from captionflow.config import CacheSettings, VideoSettings
from captionflow.errors import ConfigError


class Store(Protocol):
    url: str

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, value: bytes) -> None: ...


# scheme -> "module:factory"; a factory takes (url, cache settings, video settings).
_STORES: dict[str, str] = {
    "file": "captionflow.cache.file_store:open_file_store",
    "s3": "captionflow.cache.s3_store:open_s3_store",
}


def register_store(scheme: str, target: str) -> None:
    """Make ``scheme://`` cache stores available: ``target`` is ``"module:factory"``."""
    _STORES[scheme.lower()] = target


def open_store(url: str, settings: CacheSettings, video: VideoSettings) -> Store:
    scheme = url.split("://", 1)[0].lower() if "://" in url else "file"
    target = _STORES.get(scheme)
    if target is None:
        raise ConfigError(f"cache.store {url!r}: no store for {scheme}:// (known: "
                          f"{', '.join(sorted(_STORES))})")
    module, _, name = target.partition(":")
    factory = getattr(importlib.import_module(module), name)
    return factory(url, settings, video)


def object_name(key: str) -> str:
    """Where an entry lives under a store's root: fanned out by the key's first byte, so
    no directory (or listing) holds every entry."""
    return f"v1/{key[:2]}/{key}.json"
