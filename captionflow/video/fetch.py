"""The ``file`` and ``http(s)`` fetchers: allowed local paths, file:// and http(s) URLs.

They are registered, like ``s3`` (``s3.py``) and any third-party scheme, in
``fetchers.py``, the plug-in point; ``fetch``, ``LocalVideo`` and ``register_fetcher`` are
re-exported here for existing imports.

HTTP(S) guards, all of them per hop: the host is resolved once, every address it resolves
to must be public (not loopback, private, link-local, multicast, reserved or a metadata
service) unless inside ``video.fetch_allowed_networks``, and the connection goes to that
checked address (so a second DNS answer cannot swap it); redirects are followed by hand,
at most ``video.fetch_max_redirects``, each hop checked again; the body is streamed to disk
and cut off at ``video.max_video_bytes``; connect and read time limits, and one
wall-clock deadline over the whole fetch (every hop, headers included; ``deadline.py``).
IPv6 addresses that embed an IPv4 address (mapped, compatible, NAT64, 6to4, Teredo) are
checked by that IPv4 address too.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tempfile
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

import httpcore

from captionflow.config import VideoSettings
from captionflow.errors import (
    FetchFailedError,
    FetchTimeoutError,
    VideoForbiddenError,
    VideoNotFoundError,
    VideoTooLargeError,
)
from captionflow.video.deadline import Deadline, DeadlineBackend
from captionflow.video.fetchers import LocalVideo, fetch, register_fetcher

__all__ = ["LocalVideo", "check_address", "embedded_ipv4", "fetch", "fetch_file", "fetch_http",
           "register_fetcher", "resolve_local"]

_METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "instance-data"})


def fetch_file(reference: str, settings: VideoSettings, download_dir: Path) -> LocalVideo:
    """The ``file`` fetcher: a plain path or a ``file://`` URL naming a local path."""
    parts = urlsplit(reference)
    if len(parts.scheme) > 1:  # file://; one letter is a Windows drive, i.e. a plain path
        if parts.netloc not in ("", "localhost"):
            raise VideoForbiddenError(
                f"file:// URLs must name a local path, not host {parts.netloc!r}")
        return resolve_local(unquote(parts.path), settings)
    return resolve_local(reference, settings)


def resolve_local(reference: str, settings: VideoSettings) -> LocalVideo:
    """A path under one of ``video.allowed_roots`` (the working directory when empty, or
    anywhere with ``video.any_local_path``)."""
    if settings.any_local_path and not settings.allowed_roots:
        return _user_file(reference, settings)
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


def _user_file(reference: str, settings: VideoSettings) -> LocalVideo:
    """Any file the OS user can read; a relative path is taken from the current directory."""
    path = Path(reference).expanduser()
    try:
        real = path.resolve(strict=True)
        size = real.stat().st_size
    except FileNotFoundError as e:
        raise VideoNotFoundError(f"video {reference!r} does not exist") from e
    except PermissionError as e:
        raise VideoForbiddenError(f"video {reference!r} is not readable: {e.strerror}") from e
    except OSError as e:
        raise VideoNotFoundError(f"video {reference!r} cannot be opened: {e.strerror}") from e
    if not real.is_file():
        raise VideoNotFoundError(f"video path {reference!r} is not a regular file")
    if size > settings.max_video_bytes:
        raise VideoTooLargeError(
            f"video {reference!r} is {size} bytes, over video.max_video_bytes="
            f"{settings.max_video_bytes}")
    return LocalVideo(path=real, size_bytes=size)


# --- http(s) ---------------------------------------------------------------------------


# IPv6 forms that carry an IPv4 address in their low (or middle) bits: the IPv4 address
# inside is what a translator or tunnel finally connects to, so it is checked too.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")          # RFC 6052 well-known prefix
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215 local use: never public
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")         # deprecated ::a.b.c.d
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # SIIT ::ffff:0:a.b.c.d


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address ``ip`` embeds: IPv4-mapped, IPv4-compatible, IPv4-translated,
    NAT64 (64:ff9b::/96), 6to4 (2002::/16) and both Teredo (2001::/32) addresses."""
    found: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if ip in _NAT64 or ip in _IPV4_COMPATIBLE or ip in _IPV4_TRANSLATED:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def check_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
                  settings: VideoSettings) -> None:
    """Refuse non-public addresses, and IPv6 addresses that embed one, unless inside
    ``video.fetch_allowed_networks``."""
    allowed = [ipaddress.ip_network(cidr, strict=False)
               for cidr in settings.fetch_allowed_networks]
    inner = embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else []
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a mapped address is its IPv4 address, allow-list included
    for candidate in (ip, *inner):
        if any(candidate in net for net in allowed):
            continue
        if not candidate.is_global or candidate.is_multicast or candidate in _NAT64_LOCAL:
            shown = f"{candidate} (inside {ip})" if candidate is not ip else str(ip)
            raise VideoForbiddenError(
                f"address {shown} is loopback, private, link-local, reserved or a metadata "
                "service; add its network to video.fetch_allowed_networks to fetch from it")


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
    """Download ``reference`` with the guards in the module docstring. Every socket
    operation of every hop runs under one wall-clock deadline,
    ``video.fetch_total_timeout_s``, whatever the server sends (see ``deadline.py``)."""
    deadline = Deadline(settings.fetch_total_timeout_s)
    timeouts = {"connect": settings.fetch_connect_timeout_s,
                "read": settings.fetch_read_timeout_s,
                "write": settings.fetch_read_timeout_s,
                "pool": settings.fetch_connect_timeout_s}
    url = reference
    # The pool only ever sees checked IP addresses; redirects are followed here.
    with httpcore.ConnectionPool(network_backend=DeadlineBackend(deadline), retries=0,
                                 max_connections=1) as pool:
        for _hop in range(settings.fetch_max_redirects + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise VideoForbiddenError(f"cannot fetch {url!r}: only http(s) URLs with a host")
            if parts.scheme not in settings.allowed_schemes:
                raise VideoForbiddenError(f"scheme {parts.scheme!r} is not in allowed_schemes")
            if deadline.expired():
                raise _total_timeout(url, settings)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            ip = _resolve_host(parts.hostname, port, settings)
            netloc = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
            target = parts.path or "/"
            direct = urlunsplit((parts.scheme, netloc, target, parts.query, ""))
            host_header = parts.hostname + (f":{parts.port}" if parts.port else "")
            headers = [("Host", host_header), ("Accept-Encoding", "identity"),
                       ("User-Agent", "captionflow")]
            extensions = {"timeout": timeouts, "sni_hostname": parts.hostname}
            try:
                with pool.stream("GET", direct, headers=headers,
                                 extensions=extensions) as response:
                    fields = {k.decode("latin-1").lower(): v.decode("latin-1")
                              for k, v in response.headers}
                    if response.status in _REDIRECTS and "location" in fields:
                        url = urljoin(url, fields["location"])
                        continue
                    _check_status(url, response.status)
                    return _save(url, response, fields, settings, download_dir, deadline)
            except httpcore.TimeoutException as e:
                if deadline.expired():
                    raise _total_timeout(url, settings) from e
                raise FetchTimeoutError(f"fetching {url} timed out ({type(e).__name__})") from e
            except _HTTP_ERRORS as e:
                raise FetchFailedError(f"fetching {url} failed: {e!r}") from e
    raise FetchFailedError(
        f"fetching {reference} took more than video.fetch_max_redirects="
        f"{settings.fetch_max_redirects} redirects", retriable=False)


_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_HTTP_ERRORS = (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol,
                OSError)


def _total_timeout(url: str, settings: VideoSettings) -> FetchTimeoutError:
    return FetchTimeoutError(
        f"fetching {url} took over video.fetch_total_timeout_s="
        f"{settings.fetch_total_timeout_s:g} s (redirects and headers included)")


def _check_status(url: str, status: int) -> None:
    if status < 300:
        return
    if status in (404, 410):
        raise VideoNotFoundError(f"{url} answered HTTP {status}")
    if status in (401, 403):
        raise VideoForbiddenError(f"{url} answered HTTP {status}; the worker has no access")
    retriable = status >= 500 or status in (408, 429)
    raise FetchFailedError(f"{url} answered HTTP {status}", retriable=retriable)


def _save(url: str, response: httpcore.Response, fields: dict[str, str],
          settings: VideoSettings, download_dir: Path, deadline: Deadline) -> LocalVideo:
    limit = settings.max_video_bytes
    declared = fields.get("content-length")
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
            for chunk in response.iter_stream():
                size += len(chunk)
                if size > limit:
                    raise VideoTooLargeError(
                        f"{url} sent more than video.max_video_bytes={limit} bytes")
                out.write(chunk)
    except httpcore.TimeoutException as e:
        path.unlink(missing_ok=True)
        if deadline.expired():
            raise _total_timeout(url, settings) from e
        raise FetchTimeoutError(f"reading {url} timed out after {size} bytes") from e
    except _HTTP_ERRORS as e:
        path.unlink(missing_ok=True)
        raise FetchFailedError(f"reading {url} failed after {size} bytes: {e!r}") from e
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return LocalVideo(path=path, size_bytes=size, temporary=True, bytes_read=size)
