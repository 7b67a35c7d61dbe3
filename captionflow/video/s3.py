"""``s3://bucket/key`` references: S3 and S3-compatible stores (MinIO, Ceph, R2).

The client is boto3/botocore. Decoding is synchronous PyAV in a decode thread or child
process, and FFmpeg asks for bytes through synchronous ``read``/``seek`` callbacks, so a
synchronous client serves them directly; an asyncio client (aiobotocore, obstore's async
API, s3fs) would need an event loop inside every decode thread to answer the same calls.
botocore also resolves credentials and the endpoint through the whole AWS chain (environment,
``AWS_ENDPOINT_URL``, profiles, SSO, container and instance roles) with nothing added here.

What a decode opens is an :class:`S3File`: a picklable description of one object version
(bucket, key, size, ETag, client settings). The process that reads it builds its own client
(once per process and settings) and reads in ranges through
:class:`captionflow.video.ranged.RangeReader`. Every ranged GET names the ETag seen at
fetch time (``If-Match``), so an object replaced mid-read fails the read instead of mixing
two versions.

Errors: no such key or bucket -> ``video_not_found``; access denied -> ``video_forbidden``;
unreachable, throttling, 5xx, timeouts and rejected credentials ->
:class:`ObjectStoreUnavailableError` (a dependency outage: the worker pauses and probes
with :func:`probe_object_store`); bytes past ``video.max_video_bytes`` ->
``video_too_large``; reads that take longer in all than ``video.fetch_total_timeout_s`` ->
``fetch_timeout``.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from captionflow.config import VideoSettings
from captionflow.errors import (
    CaptionflowError,
    DependencyState,
    FetchTimeoutError,
    InvalidRequestError,
    ObjectStoreUnavailableError,
    VideoForbiddenError,
    VideoTooLargeError,
)
from captionflow.s3 import S3Config, client_for, parse_s3_url, store_error
from captionflow.video.fetchers import LocalVideo
from captionflow.video.ranged import RangeCache, RangeReader, RemoteVideo, mp4_hollow_ranges

_CHUNK_BYTES = 1 << 20
class S3File(RemoteVideo):
    """One version of one object, read in ranges (see the module docstring)."""

    def __init__(self, *, bucket: str, key: str, size_bytes: int, etag: str | None,
                 config: S3Config, total_timeout_s: float, min_fetch_bytes: int,
                 max_fetch_bytes: int, cache_bytes: int, version_id: str | None = None) -> None:
        super().__init__(name=key.rsplit("/", 1)[-1] or key, size_bytes=size_bytes)
        self.bucket, self.key, self.etag = bucket, key, etag
        self.version_id = version_id  # with the ETag and size: the caption cache's validator
        self.config = config
        self.total_timeout_s = total_timeout_s
        self.min_fetch_bytes, self.max_fetch_bytes = min_fetch_bytes, max_fetch_bytes
        self.cache_bytes = cache_bytes
        self._init_process_state()

    def _init_process_state(self) -> None:
        self._cache = RangeCache(self.cache_bytes)
        self._hollow: list[tuple[int, int]] | None = None
        self._spent_s = 0.0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in ("_cache", "_hollow", "_spent_s", "_lock"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_process_state()

    @property
    def payload_skipped(self) -> bool:
        return bool(self._hollow)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def open(self, *, index_only: bool = False) -> RangeReader:
        hollow: list[tuple[int, int]] = []
        if index_only:
            with self._lock:
                if self._hollow is None:
                    self._hollow = mp4_hollow_ranges(self._peek, self.size_bytes)
                hollow = self._hollow
        return self._reader(hollow)

    def _reader(self, hollow: list[tuple[int, int]]) -> RangeReader:
        return RangeReader(self.fetch, self.size_bytes, name=self.name, cache=self._cache,
                           counter=self.counter, min_fetch_bytes=self.min_fetch_bytes,
                           max_fetch_bytes=self.max_fetch_bytes, hollow=hollow)

    def _peek(self, pos: int, n: int) -> bytes:
        # Box headers only: a few exact small GETs, not a read-ahead into the payload.
        data = self.fetch(pos, min(pos + n, self.size_bytes))
        self.counter.add(len(data))
        return data

    def fetch(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of this object version."""
        if self._spent_s > self.total_timeout_s:
            raise FetchTimeoutError(
                f"reading {self.url} took over video.fetch_total_timeout_s="
                f"{self.total_timeout_s}")
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key,
                                "Range": f"bytes={start}-{end - 1}"}
        if self.etag:
            args["IfMatch"] = self.etag
        started = time.monotonic()
        try:
            response = client_for(self.config).get_object(**args)
            return response["Body"].read()
        except Exception as e:
            raise store_error(e, f"reading {self.url} bytes {start}-{end - 1}") from e
        finally:
            self._spent_s += time.monotonic() - started


def fetch_s3(reference: str, settings: VideoSettings, download_dir: Path) -> LocalVideo | S3File:
    """Check ``reference`` exists and fits ``video.max_video_bytes``; objects up to
    ``video.s3_whole_object_max_bytes`` are downloaded in one GET (fewer round trips than
    ranges), larger ones are returned as an :class:`S3File` for the decoder to read in
    ranges."""
    bucket, key = parse_s3_url(reference)
    config = S3Config.from_settings(settings)
    url = f"s3://{bucket}/{key}"
    started = time.monotonic()
    try:
        head = client_for(config).head_object(Bucket=bucket, Key=key)
    except Exception as e:
        error = store_error(e, f"looking up {url}")
        if isinstance(error, VideoForbiddenError):
            error = _forbidden_why(config, bucket, key, url) or error
        raise error from e
    size = int(head.get("ContentLength") or 0)
    if size > settings.max_video_bytes:
        raise VideoTooLargeError(
            f"{url} is {size} bytes, over video.max_video_bytes={settings.max_video_bytes}")
    etag = head.get("ETag")
    if size <= settings.s3_whole_object_max_bytes:
        deadline = started + settings.fetch_total_timeout_s
        return _download(url, bucket, key, etag, config, settings, download_dir, deadline)
    return S3File(bucket=bucket, key=key, size_bytes=size, etag=etag, config=config,
                  total_timeout_s=settings.fetch_total_timeout_s,
                  min_fetch_bytes=settings.s3_min_read_bytes,
                  max_fetch_bytes=settings.s3_max_read_bytes,
                  cache_bytes=settings.s3_cache_bytes, version_id=head.get("VersionId"))


def _forbidden_why(config: S3Config, bucket: str, key: str, url: str) -> CaptionflowError | None:
    """A HEAD refusal has no body, so "access denied to this object" and "the worker's
    credentials are refused" look alike; a one-byte GET returns the store's error code."""
    try:
        client_for(config).get_object(Bucket=bucket, Key=key, Range="bytes=0-0")
    except Exception as e:
        return store_error(e, f"reading {url}")
    return None


def _download(url: str, bucket: str, key: str, etag: str | None, config: S3Config,
              settings: VideoSettings, download_dir: Path, deadline: float) -> LocalVideo:
    limit = settings.max_video_bytes
    args: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if etag:
        args["IfMatch"] = etag
    download_dir.mkdir(parents=True, exist_ok=True)
    suffix = Path(key).suffix[:16]
    fd, name = tempfile.mkstemp(prefix="captionflow-", suffix=suffix, dir=download_dir)
    path = Path(name)
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                body = client_for(config).get_object(**args)["Body"]
                chunks: Iterator[bytes] = body.iter_chunks(_CHUNK_BYTES)
                for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise VideoTooLargeError(
                            f"{url} sent more than video.max_video_bytes={limit} bytes")
                    if time.monotonic() > deadline:
                        raise FetchTimeoutError(
                            f"downloading {url} took over video.fetch_total_timeout_s="
                            f"{settings.fetch_total_timeout_s}")
                    out.write(chunk)
            except CaptionflowError:
                raise
            except Exception as e:
                raise store_error(e, f"downloading {url} (after {size} bytes)") from e
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return LocalVideo(path=path, size_bytes=size, temporary=True, bytes_read=size)


def list_objects(url: str, settings: VideoSettings) -> Iterator[tuple[str, int]]:
    """(key, size) of every object under ``s3://bucket/prefix``, in key order, folder
    markers left out. Listing needs s3:ListBucket; listings carry no content type, so
    callers ask :func:`content_type` for the keys they cannot judge by name."""
    bucket, _, prefix = url[5:].partition("/") if url.lower().startswith("s3://") else ("", "", "")
    if not bucket:
        raise InvalidRequestError(f"{url!r} is not an s3://BUCKET/PREFIX URL")
    client = client_for(S3Config.from_settings(settings))
    try:
        for page in client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                if not item["Key"].endswith("/"):
                    yield item["Key"], int(item.get("Size") or 0)
    except Exception as e:
        raise store_error(e, f"listing {url}") from e


def content_type(bucket: str, key: str, settings: VideoSettings) -> str:
    try:
        head = client_for(S3Config.from_settings(settings)).head_object(Bucket=bucket, Key=key)
    except Exception as e:
        raise store_error(e, f"looking up s3://{bucket}/{key}") from e
    return str(head.get("ContentType") or "")


def _answers(settings: VideoSettings, timeout_s: float) -> DependencyState:
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    base = S3Config.from_settings(settings)
    config = S3Config(endpoint_url=base.endpoint_url, region=base.region,
                      profile=base.profile, addressing_style=base.addressing_style,
                      connect_timeout_s=min(base.connect_timeout_s, timeout_s),
                      read_timeout_s=timeout_s, max_attempts=1)
    try:
        client_for(config).list_buckets()
    except (ClientError, NoCredentialsError, PartialCredentialsError) as e:
        # The probe's answer is what a record's request would get: refused credentials are
        # "misconfigured", throttling "overloaded", a server failure "down". Any other
        # refusal (no s3:ListAllMyBuckets for valid credentials) means the store is up.
        error = store_error(e, "probing the object store")
        if isinstance(error, ObjectStoreUnavailableError):
            return error.state
        return DependencyState.UP
    except Exception:
        return DependencyState.DOWN
    return DependencyState.UP


async def probe_object_store(settings: VideoSettings, *, timeout_s: float = 5.0
                             ) -> DependencyState:
    """What the configured store says to a cheap signed request within ``timeout_s`` (the
    worker's dependency probe after an :class:`ObjectStoreUnavailableError`)."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(_answers, settings, timeout_s),
                                      timeout_s + 1.0)
    except TimeoutError:
        return DependencyState.DOWN
