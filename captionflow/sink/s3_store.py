"""``s3://bucket/prefix/`` as the destination, through the same boto3 client, endpoint and
credential chain as video reads (:mod:`captionflow.s3`).

An object appears only when its PUT completes, or when its multipart upload is completed:
readers never see a part of a file. A failed multipart upload is aborted; one cut short by
a crash stays invisible until the bucket's lifecycle rule removes it (docs/sink.md).
"""

from __future__ import annotations

from typing import Any

from captionflow.config import Settings
from captionflow.errors import ConfigError, ObjectStoreUnavailableError
from captionflow.s3 import S3Config, client_for, put_whole, store_error


class S3Store:
    def __init__(self, bucket: str, prefix: str, config: S3Config, *, part_bytes: int) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.config = config
        self.part_bytes = part_bytes
        self.url = f"s3://{bucket}/{prefix}"

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> S3Store:
        bucket, _, prefix = url[5:].partition("/")
        if not bucket:
            raise ConfigError(f"sink destination {url!r} names no bucket: s3://BUCKET/PREFIX/")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        video, sink = settings.video, settings.sink
        config = S3Config(endpoint_url=sink.s3_endpoint_url or video.s3_endpoint_url,
                          region=video.s3_region, profile=video.s3_profile,
                          addressing_style=video.s3_addressing_style,
                          connect_timeout_s=video.fetch_connect_timeout_s,
                          read_timeout_s=video.fetch_read_timeout_s,
                          max_attempts=video.s3_max_attempts)
        return cls(bucket, prefix, config, part_bytes=sink.s3_part_bytes)

    @property
    def _s3(self) -> Any:
        return client_for(self.config)

    def _fail(self, e: Exception, what: str) -> ObjectStoreUnavailableError:
        # Whatever the store answered (missing bucket, refused credentials, 5xx), the rows
        # stay buffered and the write is retried: never the records' fault.
        error = store_error(e, what)
        return ObjectStoreUnavailableError(error.message)

    def put(self, key: str, body: bytes) -> None:
        full = self.prefix + key
        try:
            put_whole(self._s3, self.bucket, full, body, part_bytes=self.part_bytes)
        except Exception as e:
            raise self._fail(e, f"writing s3://{self.bucket}/{full}") from e

    def probe(self) -> bool:
        """A HEAD of the bucket, one attempt. A missing bucket, throttling or a failing
        store is down; any other answer (a refusal of HEAD included) is up: whether the
        PUT is allowed is for the write to find out."""
        from botocore.exceptions import ClientError

        base = self.config
        quick = S3Config(endpoint_url=base.endpoint_url, region=base.region,
                         profile=base.profile, addressing_style=base.addressing_style,
                         connect_timeout_s=min(base.connect_timeout_s, 3.0),
                         read_timeout_s=min(base.read_timeout_s, 5.0), max_attempts=1)
        try:
            client_for(quick).head_bucket(Bucket=self.bucket)
        except ClientError as e:
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            return not (status in (404, 429) or status >= 500)
        except Exception:
            return False
        return True

    def clean_temporary(self, dataset: str, prefix: str) -> int:
        return 0  # nothing is written under a temporary name
