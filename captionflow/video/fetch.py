"""Resolve a video reference to a local file: allowed local paths, file://, http(s).

Object stores plug in through :func:`register_fetcher`: a function from (reference,
settings, download directory) to a :class:`LocalVideo`. The scheme must also be listed in
``video.allowed_schemes``.

HTTP(S) guards, all of them per hop: the host is resolved once, every address it resolves
to must be public (not loopback, private, link-local, multicast, reserved or a metadata
service) unless inside ``video.fetch_allowed_networks``, and the connection goes to that
checked address (so a second DNS answer cannot swap it); redirects are followed by hand,
at most ``video.fetch_max_redirects``, each hop checked again; the body is streamed to disk
and cut off at ``video.max_video_bytes``; connect, read and whole-download time limits.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

import httpx

from captionflow.config import VideoSettings
from captionflow.errors import (
    FetchFailedError,
    FetchTimeoutError,
    InvalidRequestError,
    VideoForbiddenError,
    VideoNotFoundError,
    VideoTooLargeError,
)

_CHUNK_BYTES = 1 << 20
_METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "instance-data"})


@dataclass(frozen=True, slots=True)
class LocalVideo:
    """A readable local file; ``temporary`` files are deleted by :meth:`release`."""

    path: Path
    size_bytes: int
    temporary: bool = False

    def release(self) -> None:
        if self.temporary:
            self.path.unlink(missing_ok=True)


Fetcher = Callable[[str, VideoSettings, Path], LocalVideo]
_FETCHERS: dict[str, Fetcher] = {}


def register_fetcher(scheme: str, fetcher: Fetcher) -> None:
    """Make ``scheme://`` references fetchable (e.g. ``s3``); also allow the scheme in
    ``video.allowed_schemes``."""
    _FETCHERS[scheme.lower()] = fetcher


def fetch(reference: str, settings: VideoSettings) -> LocalVideo:
    """Resolve ``reference`` (a path, ``file://`` or ``scheme://`` URL) to a local file."""
    if not reference or "\x00" in reference:
        raise InvalidRequestError("the video reference is empty or contains a NUL byte")
    parts = urlsplit(reference)
    # One-letter "schemes" are Windows drive letters, i.e. plain paths.
    scheme = parts.scheme.lower() if len(parts.scheme) > 1 else ""
    if scheme in ("", "file"):
        if "file" not in settings.allowed_schemes:
            raise VideoForbiddenError(
                "local files are not allowed: add 'file' to video.allowed_schemes")
        if scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise VideoForbiddenError(
                    f"file:// URLs must name a local path, not host {parts.netloc!r}")
            return resolve_local(unquote(parts.path), settings)
        return resolve_local(reference, settings)
    if scheme not in settings.allowed_schemes:
        raise VideoForbiddenError(
            f"scheme {scheme!r} is not allowed (video.allowed_schemes="
            f"{list(settings.allowed_schemes)})")
    fetcher = _FETCHERS.get(scheme)
    if fetcher is None:
        raise InvalidRequestError(
            f"no fetcher for {scheme}:// references; register one with "
            "captionflow.video.fetch.register_fetcher")
    download_dir = settings.download_dir or Path(tempfile.gettempdir())
    return fetcher(reference, settings, download_dir)


def resolve_local(reference: str, settings: VideoSettings) -> LocalVideo:
    """A path under one of ``video.allowed_roots`` (the working directory when empty)."""
    raw = Path(reference)
    if ".." in raw.parts:
        raise VideoForbiddenError(f"video path {reference!r} contains '..'; give a direct path")
    roots = [Path(r).resolve() for r in settings.allowed_roots] or [Path.cwd().resolve()]
    candidates = [raw] if raw.is_absolute() else [root / raw for root in roots]
    for candidate in candidates:
        # resolve() follows symlinks, so a link pointing out of a root is caught here.
        real = candidate.resolve()
        inside = any(real == root or real.is_relative_to(root) for root in roots)
        if not inside:
            raise VideoForbiddenError(
                f"video path {reference!r} resolves outside the allowed roots "
                f"{[str(r) for r in roots]}; add its directory to video.allowed_roots")
        if real.is_file():
            size = real.stat().st_size
            if size > settings.max_video_bytes:
                raise VideoTooLargeError(
                    f"video {reference!r} is {size} bytes, over video.max_video_bytes="
                    f"{settings.max_video_bytes}")
            return LocalVideo(path=real, size_bytes=size)
        if real.exists():
            raise VideoNotFoundError(f"video path {reference!r} is not a regular file")
    raise VideoNotFoundError(
        f"video {reference!r} does not exist under {[str(r) for r in roots]}")


# --- http(s) ---------------------------------------------------------------------------


def check_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
                  settings: VideoSettings) -> None:
    """Refuse non-public addresses unless inside ``video.fetch_allowed_networks``."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for cidr in settings.fetch_allowed_networks:
        if ip in ipaddress.ip_network(cidr, strict=False):
            return
    if not ip.is_global or ip.is_multicast:
        raise VideoForbiddenError(
            f"address {ip} is loopback, private, link-local, reserved or a metadata service; "
            "add its network to video.fetch_allowed_networks to fetch from it")


def _resolve_host(host: str, port: int, settings: VideoSettings) -> str:
    """The first address of ``host`` after checking every address it resolves to."""
    if host.lower().rstrip(".") in _METADATA_HOSTS:
        raise VideoForbiddenError(f"host {host!r} is a cloud metadata service")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise FetchFailedError(f"cannot resolve host {host!r}: {e}") from e
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addresses:
        raise FetchFailedError(f"host {host!r} has no address")
    for ip in addresses:
        check_address(ip, settings)
    return str(addresses[0])


def fetch_http(reference: str, settings: VideoSettings, download_dir: Path) -> LocalVideo:
    timeout = httpx.Timeout(connect=settings.fetch_connect_timeout_s,
                            read=settings.fetch_read_timeout_s,
                            write=settings.fetch_read_timeout_s,
                            pool=settings.fetch_connect_timeout_s)
    deadline = time.monotonic() + settings.fetch_total_timeout_s
    url = reference
    # The client only ever sees checked IP addresses; redirects are followed here.
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for _hop in range(settings.fetch_max_redirects + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise VideoForbiddenError(f"cannot fetch {url!r}: only http(s) URLs with a host")
            if parts.scheme not in settings.allowed_schemes:
                raise VideoForbiddenError(f"scheme {parts.scheme!r} is not in allowed_schemes")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            ip = _resolve_host(parts.hostname, port, settings)
            netloc = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
            direct = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
            host_header = parts.hostname + (f":{parts.port}" if parts.port else "")
            request = client.build_request(
                "GET", direct, headers={"Host": host_header},
                extensions={"sni_hostname": parts.hostname})
            try:
                response = client.send(request, stream=True)
            except httpx.TimeoutException as e:
                raise FetchTimeoutError(f"fetching {url} timed out ({type(e).__name__})") from e
            except httpx.HTTPError as e:
                raise FetchFailedError(f"fetching {url} failed: {e}") from e
            try:
                if response.is_redirect:
                    location = response.headers.get("location", "")
                    url = urljoin(url, location)
                    continue
                _check_status(url, response)
                return _save(url, response, settings, download_dir, deadline)
            finally:
                response.close()
    raise FetchFailedError(
        f"fetching {reference} took more than video.fetch_max_redirects="
        f"{settings.fetch_max_redirects} redirects", retriable=False)


def _check_status(url: str, response: httpx.Response) -> None:
    status = response.status_code
    if status < 300:
        return
    if status in (404, 410):
        raise VideoNotFoundError(f"{url} answered HTTP {status}")
    if status in (401, 403):
        raise VideoForbiddenError(f"{url} answered HTTP {status}; the worker has no access")
    retriable = status >= 500 or status in (408, 429)
    raise FetchFailedError(f"{url} answered HTTP {status}", retriable=retriable)


def _save(url: str, response: httpx.Response, settings: VideoSettings, download_dir: Path,
          deadline: float) -> LocalVideo:
    limit = settings.max_video_bytes
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise VideoTooLargeError(
            f"{url} is {declared} bytes, over video.max_video_bytes={limit}")
    download_dir.mkdir(parents=True, exist_ok=True)
    suffix = Path(urlsplit(url).path).suffix[:16]
    fd, name = tempfile.mkstemp(prefix="captionflow-", suffix=suffix, dir=download_dir)
    path = Path(name)
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in response.iter_bytes(_CHUNK_BYTES):
                size += len(chunk)
                if size > limit:
                    raise VideoTooLargeError(
                        f"{url} sent more than video.max_video_bytes={limit} bytes")
                if time.monotonic() > deadline:
                    raise FetchTimeoutError(
                        f"fetching {url} took over video.fetch_total_timeout_s="
                        f"{settings.fetch_total_timeout_s}")
                out.write(chunk)
    except httpx.TimeoutException as e:
        path.unlink(missing_ok=True)
        raise FetchTimeoutError(f"reading {url} timed out after {size} bytes") from e
    except httpx.HTTPError as e:
        path.unlink(missing_ok=True)
        raise FetchFailedError(f"reading {url} failed after {size} bytes: {e}") from e
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return LocalVideo(path=path, size_bytes=size, temporary=True)


register_fetcher("http", fetch_http)
register_fetcher("https", fetch_http)
