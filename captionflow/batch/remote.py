"""Batch files in S3: ``s3://bucket/key`` outputs, checkpoints and DataFlow cache paths.

Written whole (:func:`captionflow.s3.put_whole`: one PUT, or a multipart upload that is
completed or aborted, so a reader and a resumed run see the previous checkpoint or the new
one, never half a file), and read with the same client and credential chain as video reads.
"""

from __future__ import annotations

from pathlib import Path

from captionflow.config import SinkSettings, VideoSettings
from captionflow.errors import ConfigError
from captionflow.s3 import S3Config, client_for, parse_s3_url, put_whole, store_error


def remote_url(path: str | Path) -> str | None:
    """``s3://bucket/key`` for an S3 location, also in the form ``pathlib`` leaves of one
    (``s3:/bucket/key``: a ``Path`` merges the two slashes); None for a local path."""
    text = str(path)
    if text[:5].lower() == "s3://":
        return text
    if text[:4].lower() == "s3:/":
        return "s3://" + text[4:]
    return None


def _config(video: VideoSettings | None) -> S3Config:
    if video is None:
        from captionflow.config import Settings

        video = Settings.load().video  # the Python API: settings from the environment
    return S3Config.from_settings(video)


def read_remote(url: str, video: VideoSettings | None = None) -> bytes | None:
    """The object's bytes, or None when there is no such object."""
    bucket, key = parse_s3_url(url)
    try:
        return client_for(_config(video)).get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as e:
        code = str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))
        if code in ("NoSuchKey", "404", "NotFound"):
            return None
        raise store_error(e, f"reading {url}") from e


def write_remote(url: str, body: bytes, video: VideoSettings | None = None) -> None:
    bucket, key = parse_s3_url(url)
    if key.endswith("/"):
        raise ConfigError(f"{url} names a folder; batch output needs a file name")
    try:
        put_whole(client_for(_config(video)), bucket, key, body,
                  part_bytes=SinkSettings().s3_part_bytes)
    except Exception as e:
        raise store_error(e, f"writing {url}") from e
