"""The S3 client stack that video reads, the caption cache, the sink and batch files share:
one boto3 client per process and settings (boto3 resolves credentials and the endpoint
through the whole AWS chain), botocore errors as captionflow's typed errors, and whole-object
writes that a reader sees entirely or not at all."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

from captionflow.config import VideoSettings
from captionflow.errors import (
    CaptionflowError,
    DependencyState,
    FetchFailedError,
    InvalidRequestError,
    ObjectStoreUnavailableError,
    VideoForbiddenError,
    VideoNotFoundError,
)

_NOT_FOUND = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404", "NoSuchVersion"})
_FORBIDDEN = frozenset({"AccessDenied", "Forbidden", "403", "AllAccessDisabled",
                        "AccountProblem"})
# The worker's own credentials are refused: every record would fail alike, so it is the
# store dependency that is unusable, not the record.
_CREDENTIALS = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                          "InvalidToken", "TokenRefreshRequired", "RequestTimeTooSkewed"})
_SLOW_DOWN = frozenset({"SlowDown", "Throttling", "ThrottlingException",
                        "RequestLimitExceeded", "TooManyRequests"})
_THROTTLED = _SLOW_DOWN | {"RequestTimeout", "InternalError", "ServiceUnavailable"}


@dataclass(frozen=True, slots=True)
class S3Config:
    """Client settings a process needs to build its own client (picklable, hashable).

    ``None`` leaves a value to the AWS chain (environment, config files, instance role)."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    addressing_style: str = "auto"
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    max_attempts: int = 3

    @classmethod
    def from_settings(cls, settings: VideoSettings) -> S3Config:
        return cls(endpoint_url=settings.s3_endpoint_url, region=settings.s3_region,
                   profile=settings.s3_profile, addressing_style=settings.s3_addressing_style,
                   connect_timeout_s=settings.fetch_connect_timeout_s,
                   read_timeout_s=settings.fetch_read_timeout_s,
                   max_attempts=settings.s3_max_attempts)


_clients: dict[tuple[int, S3Config], Any] = {}
_clients_lock = threading.Lock()


def client_for(config: S3Config) -> Any:
    """This process's client for ``config`` (botocore clients are thread-safe; sessions
    are not, so one is built per client under a lock; a forked child builds its own)."""
    key = (os.getpid(), config)
    client = _clients.get(key)
    if client is not None:
        return client
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _new_client(config)
            _clients[key] = client
    return client


def _new_client(config: S3Config) -> Any:
    try:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError
    except ImportError as e:  # pragma: no cover - boto3 is a dependency
        raise ObjectStoreUnavailableError(
            "s3:// references need boto3: pip install boto3") from e
    try:
        session = boto3.session.Session(profile_name=config.profile,
                                        region_name=config.region)
        return session.client(
            "s3", endpoint_url=config.endpoint_url,
            config=Config(connect_timeout=config.connect_timeout_s,
                          read_timeout=config.read_timeout_s,
                          retries={"mode": "standard",
                                   "total_max_attempts": config.max_attempts},
                          s3={"addressing_style": config.addressing_style},
                          user_agent_extra="captionflow"))
    except BotoCoreError as e:
        raise ObjectStoreUnavailableError(
            f"cannot build an S3 client ({e}); check video.s3_profile, AWS_PROFILE and "
            "AWS_ENDPOINT_URL") from e


def parse_s3_url(reference: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key). The key is taken literally (as the AWS CLI
    does): no percent-decoding, ``?`` and ``#`` are part of it."""
    if not reference.lower().startswith("s3://"):
        raise InvalidRequestError(f"{reference!r} is not an s3:// reference")
    bucket, _, key = reference[5:].partition("/")
    if not bucket or not key:
        raise InvalidRequestError(
            f"{reference!r} must name a bucket and a key: s3://BUCKET/KEY")
    return bucket, key


def store_error(e: Exception, what: str) -> CaptionflowError:
    """A botocore exception as captionflow's typed error."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    if isinstance(e, CaptionflowError):
        return e
    if isinstance(e, ClientError):
        error = e.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        detail = f"{what}: {code or status} {error.get('Message') or ''}".rstrip()
        if code in _CREDENTIALS:
            return ObjectStoreUnavailableError(
                f"{detail}; the store refuses the worker's credentials: check "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, the profile or the role",
                state=DependencyState.MISCONFIGURED)
        if code in _NOT_FOUND or status == 404:
            return VideoNotFoundError(f"{detail}; check the bucket and key")
        if code in _FORBIDDEN or status == 403:
            return VideoForbiddenError(
                f"{detail}; the worker's identity needs s3:GetObject on the object "
                "(docs/storage.md)")
        if code == "PreconditionFailed" or status == 412:
            return FetchFailedError(f"{detail}; the object changed while it was read")
        if code in _SLOW_DOWN or status in (429, 503):
            return ObjectStoreUnavailableError(f"{detail}; the store is throttling",
                                               state=DependencyState.OVERLOADED)
        if code in _THROTTLED or status >= 500:
            return ObjectStoreUnavailableError(f"{detail}; the store is failing")
        return FetchFailedError(detail, retriable=False)
    if isinstance(e, NoCredentialsError | PartialCredentialsError):
        return ObjectStoreUnavailableError(
            f"{what}: no usable AWS credentials ({e}); set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, a profile, or give the worker a role",
            state=DependencyState.MISCONFIGURED)
    if isinstance(e, BotoCoreError | OSError):
        return ObjectStoreUnavailableError(f"{what}: the store does not answer ({e})")
    return ObjectStoreUnavailableError(f"{what}: {type(e).__name__}: {e}")


def put_whole(client: Any, bucket: str, key: str, body: bytes, *, part_bytes: int) -> None:
    """Write ``body`` as one object that appears only once whole: one PUT, or a multipart
    upload that is completed, or aborted when it fails (one cut short by a crash stays
    invisible until the bucket's lifecycle rule removes it). Raises botocore's errors."""
    if len(body) <= part_bytes:
        client.put_object(Bucket=bucket, Key=key, Body=body)
        return
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    try:
        parts = []
        view = memoryview(body)
        for number, start in enumerate(range(0, len(body), part_bytes), start=1):
            answer = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id,
                                        PartNumber=number,
                                        Body=bytes(view[start:start + part_bytes]))
            parts.append({"PartNumber": number, "ETag": answer["ETag"]})
        client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                         MultipartUpload={"Parts": parts})
    except Exception:
        try:
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except Exception:  # the store is failing; its lifecycle rule cleans up
            pass
        raise
