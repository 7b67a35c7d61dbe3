"""Bytes <-> events, in exactly one place each way (orjson)."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from captionflow.errors import (
    CaptionflowError,
    MalformedJsonError,
    PayloadTooLargeError,
    SchemaInvalidError,
)
from captionflow.schemas.events import (
    CaptionEvent,
    DeadLetterEvent,
    ErrorInfo,
    SourceCoordinates,
    VideoEvent,
)

M = TypeVar("M", bound=BaseModel)


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def encode(event: BaseModel) -> bytes:
    """Serialise any event model: aliases (``from``), no ``None`` fields."""
    return orjson.dumps(event.model_dump(mode="json", by_alias=True, exclude_none=True))


def parse_json(raw: bytes | str | None) -> Any:
    if raw is None:
        raise MalformedJsonError("record has no value (a tombstone?); expected a JSON object")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise MalformedJsonError(f"value is not valid JSON: {e}") from e


def validate(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise SchemaInvalidError(describe_validation_error(e, model.__name__)) from e


def decode_video_event(raw: bytes | None, *, fallback_id: str | None = None,
                       max_bytes: int | None = None) -> VideoEvent:
    """Parse one input record.

    ``fallback_id`` (the record key, or its coordinates) stands in for a missing ``id`` so
    producers that do not set one still get a stable idempotency key across redeliveries.
    """
    if raw is not None and max_bytes is not None and len(raw) > max_bytes:
        raise PayloadTooLargeError(
            f"record is {len(raw)} bytes, above kafka.max_event_bytes={max_bytes}; send a "
            "reference to the video, not the video itself")
    data = parse_json(raw)
    if isinstance(data, dict) and "id" not in data and fallback_id is not None:
        data["id"] = fallback_id
    return validate(VideoEvent, data)


def decode_caption_event(raw: bytes) -> CaptionEvent:
    return validate(CaptionEvent, parse_json(raw))


def decode_dead_letter_event(raw: bytes) -> DeadLetterEvent:
    return validate(DeadLetterEvent, parse_json(raw))


def peek_event_id(raw: bytes | None) -> str | None:
    """Best-effort event id from a payload that failed validation."""
    try:
        data = orjson.loads(raw) if raw is not None else None
    except orjson.JSONDecodeError:
        return None
    if isinstance(data, dict) and isinstance(data.get("id"), str) and data["id"]:
        return data["id"][:256]
    return None


# Bounds on the text fields of a dead-letter event besides the payload, so that it always
# fits the producer's limit whatever the record held.
MAX_KEY_BYTES = 1024
MAX_MESSAGE_CHARS = 4096


def dead_letter(raw: bytes | None, error: CaptionflowError, *, attempts: int = 1,
                key: bytes | None = None, source: SourceCoordinates | None = None,
                event_id: str | None = None, worker: str | None = None,
                payload_max_bytes: int | None = None) -> DeadLetterEvent:
    """The dead-letter event for ``raw``. With ``payload_max_bytes`` it carries at most
    that prefix of the payload, with the whole payload's size and sha256 to match it."""
    size = len(raw) if raw is not None else 0
    truncated = payload_max_bytes is not None and size > payload_max_bytes
    kept = raw[:payload_max_bytes] if truncated and raw is not None else raw
    payload, encoding = payload_text(kept, prefix=truncated)
    message = error.message if len(error.message) <= MAX_MESSAGE_CHARS else \
        error.message[:MAX_MESSAGE_CHARS] + "..."
    return DeadLetterEvent(
        id=event_id or peek_event_id(raw),
        error=ErrorInfo(code=error.code, message=message, retriable=error.retriable,
                        attempts=attempts),
        payload=payload, payload_encoding=encoding, payload_size_bytes=size,
        payload_sha256=hashlib.sha256(raw or b"").hexdigest(), payload_truncated=truncated,
        key=payload_text(key[:MAX_KEY_BYTES], prefix=len(key) > MAX_KEY_BYTES)[0]
        if key is not None else None,
        source=source, worker=worker, created_at=now_rfc3339())


def payload_text(raw: bytes | None, *, prefix: bool = False) -> tuple[str, str]:
    """``raw`` as text when it is UTF-8, else base64. A ``prefix`` may end inside a
    multi-byte character; that partial character alone is dropped."""
    if raw is None:
        return "", "utf-8"
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError as e:
        if prefix and e.start >= len(raw) - 3 and e.reason == "unexpected end of data":
            return raw[:e.start].decode("utf-8"), "utf-8"
        return base64.b64encode(raw).decode("ascii"), "base64"


def describe_validation_error(e: ValidationError, what: str) -> str:
    parts = []
    for err in e.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{where}: {err['msg']}")
    more = f" (+{e.error_count() - 5} more)" if e.error_count() > 5 else ""
    return f"not a valid {what}: " + "; ".join(parts) + more
