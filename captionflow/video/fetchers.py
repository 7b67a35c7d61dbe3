"""The fetcher plug-in point: what a fetcher returns, the registry, and :func:`fetch`.

A fetcher is a function from (reference, settings, download directory) to a
:class:`LocalVideo`, or to a :class:`~captionflow.video.ranged.RemoteVideo` that the decoder
reads in ranges. :func:`register_fetcher` makes ``scheme://`` references fetchable; the
fetcher may be given as ``"package.module:function"``, imported on the first reference of
that scheme (so boto3 costs nothing to a worker that never sees ``s3://``). The built-in
schemes are registered that way below, like any other: ``file`` (and plain paths),
``http``, ``https`` and ``s3``. A scheme must also be listed in ``video.allowed_schemes``.

This module imports no fetcher: a fetcher imports it (for :class:`LocalVideo`), never the
other way round.
"""

from __future__ import annotations

import importlib
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from captionflow.config import VideoSettings
from captionflow.errors import (
    ConfigError,
    ErrorCode,
    FatalError,
    InvalidRequestError,
    VideoForbiddenError,
)
from captionflow.video.ranged import RemoteVideo


@dataclass(frozen=True, slots=True)
class LocalVideo:
    """A readable local file; ``temporary`` files are deleted by :meth:`release`."""

    path: Path
    size_bytes: int
    temporary: bool = False
    # Bytes fetched over the network to make this file (None: it was already local).
    bytes_read: int | None = None

    @property
    def source(self) -> Path:
        """What the decoder opens (a :class:`RemoteVideo` is read in ranges instead)."""
        return self.path

    def release(self) -> None:
        if self.temporary:
            self.path.unlink(missing_ok=True)


Fetcher = Callable[[str, VideoSettings, Path], "LocalVideo | RemoteVideo"]
# A fetcher, or where to import it from ("package.module:function").
_FETCHERS: dict[str, Fetcher | str] = {}


def register_fetcher(scheme: str, fetcher: Fetcher | str) -> None:
    """Make ``scheme://`` references fetchable (e.g. ``gs``) with ``fetcher``, a function or
    ``"package.module:function"`` imported on first use; also allow the scheme in
    ``video.allowed_schemes``. Registering a scheme again replaces its fetcher."""
    _FETCHERS[scheme.lower()] = fetcher


def fetcher_for(scheme: str) -> Fetcher | None:
    """The fetcher registered for ``scheme``, imported now if it was registered by name.
    A registration that does not import is this deployment's fault, never a record's: a
    fatal ``config_invalid`` (``check_fetchers`` finds it at start-up instead)."""
    fetcher = _FETCHERS.get(scheme)
    if isinstance(fetcher, str):
        module, _, name = fetcher.partition(":")
        try:
            fetcher = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise FatalError(f"the fetcher registered for {scheme}:// ({_FETCHERS[scheme]!r}) "
                             f"cannot be imported: {e}; fix or remove its register_fetcher "
                             "call", code=ErrorCode.CONFIG_INVALID) from e
        _FETCHERS[scheme] = fetcher
    return fetcher


def check_fetchers(schemes: Iterable[str]) -> None:
    """Import now the fetcher of every scheme in ``schemes`` (``video.allowed_schemes``);
    ``ConfigError`` names a scheme with no fetcher or one that does not import, so that a
    worker refuses to start rather than fail every such record."""
    for scheme in schemes:
        try:
            fetcher = fetcher_for(scheme)
        except FatalError as e:
            raise ConfigError(e.message) from e.__cause__
        if fetcher is None:
            raise ConfigError(f"video.allowed_schemes has {scheme!r}, but no fetcher is "
                              f"registered for {scheme}:// references: register one with "
                              "captionflow.video.register_fetcher, or remove the scheme")


def fetch(reference: str, settings: VideoSettings) -> LocalVideo | RemoteVideo:
    """Resolve ``reference`` (a path, ``file://`` or ``scheme://`` URL) to a local file, or
    to a :class:`RemoteVideo` the decoder reads in ranges (object stores)."""
    if not reference or "\x00" in reference:
        raise InvalidRequestError("the video reference is empty or contains a NUL byte")
    parts = urlsplit(reference)
    # One-letter "schemes" are Windows drive letters: plain paths, like no scheme at all.
    scheme = parts.scheme.lower() if len(parts.scheme) > 1 else "file"
    if scheme not in settings.allowed_schemes:
        if scheme == "file":
            raise VideoForbiddenError(
                "local files are not allowed: add 'file' to video.allowed_schemes")
        raise VideoForbiddenError(
            f"scheme {scheme!r} is not allowed (video.allowed_schemes="
            f"{list(settings.allowed_schemes)})")
    fetcher = fetcher_for(scheme)
    if fetcher is None:
        raise InvalidRequestError(
            f"no fetcher for {scheme}:// references; register one with "
            "captionflow.video.register_fetcher")
    download_dir = settings.download_dir or Path(tempfile.gettempdir())
    return fetcher(reference, settings, download_dir)


register_fetcher("file", "captionflow.video.fetch:fetch_file")
register_fetcher("http", "captionflow.video.fetch:fetch_http")
register_fetcher("https", "captionflow.video.fetch:fetch_http")
register_fetcher("s3", "captionflow.video.s3:fetch_s3")
