"""The shared store: an S3 (or S3-compatible) prefix, ``s3://bucket/prefix/``.

It reuses the video reader's client stack (``captionflow.s3``: boto3, the whole AWS
credential chain, ``video.s3_endpoint_url``/region/profile), with the connect and read
timeouts of ``cache.timeout_ms`` and a single attempt: a slow store makes a miss, not a
wait. An entry is one object; PUTs of one key write the same bytes, so nothing is locked.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from captionflow.cache.stores import object_name
from captionflow.config import CacheSettings, VideoSettings
from captionflow.errors import CacheUnavailableError, ConfigError
from captionflow.s3 import S3Config, client_for

_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})


class S3Store:
    def __init__(self, bucket: str, prefix: str, config: S3Config) -> None:
        self.bucket, self.prefix, self._config = bucket, prefix, config
        self.url = f"s3://{bucket}/{prefix}"

    def _s3(self) -> Any:
        return client_for(self._config)

    def get(self, key: str) -> bytes | None:
        name = self.prefix + object_name(key)
        try:
            return self._s3().get_object(Bucket=self.bucket, Key=name)["Body"].read()
        except Exception as e:
            code = str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))
            if code in _MISSING:
                return None
            raise CacheUnavailableError(
                f"reading cache entry s3://{self.bucket}/{name}: {type(e).__name__}: {e}") \
                from e

    def put(self, key: str, value: bytes) -> None:
        name = self.prefix + object_name(key)
        try:
            self._s3().put_object(Bucket=self.bucket, Key=name, Body=value,
                                      ContentType="application/json")
        except Exception as e:
            raise CacheUnavailableError(
                f"writing cache entry s3://{self.bucket}/{name}: {type(e).__name__}: {e}") \
                from e


def open_s3_store(url: str, settings: CacheSettings, video: VideoSettings) -> S3Store:
    bucket, _, prefix = url[5:].partition("/")
    if not bucket:
        raise ConfigError(f"cache.store {url!r} must name a bucket: s3://BUCKET/PREFIX/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    timeout_s = settings.timeout_ms / 1000
    config = dataclasses.replace(S3Config.from_settings(video), connect_timeout_s=timeout_s,
                                 read_timeout_s=timeout_s, max_attempts=1)
    return S3Store(bucket, prefix, config)
