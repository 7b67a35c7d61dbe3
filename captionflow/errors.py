"""Every error captionflow raises, with a stable code and a ``retriable`` flag.

Codes are part of the public contract: they land in dead-letter events and in batch-mode
rows, and users alert on them. Add codes; never rename or reuse one. The table in
``docs/errors.md`` is checked against :class:`ErrorCode` by the tests.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    # The record itself
    MALFORMED_JSON = "malformed_json"
    SCHEMA_INVALID = "schema_invalid"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    # Fetching the video
    VIDEO_NOT_FOUND = "video_not_found"
    VIDEO_FORBIDDEN = "video_forbidden"
    VIDEO_TOO_LARGE = "video_too_large"
    FETCH_TIMEOUT = "fetch_timeout"
    FETCH_FAILED = "fetch_failed"
    # Decoding the video
    VIDEO_UNREADABLE = "video_unreadable"
    VIDEO_EMPTY = "video_empty"
    VIDEO_TOO_LONG = "video_too_long"
    # Captioning
    PROMPT_TOO_LONG = "prompt_too_long"
    INVALID_REQUEST = "invalid_request"
    ENGINE_OVERLOADED = "engine_overloaded"
    ENGINE_FAILED = "engine_failed"
    ENGINE_DEAD = "engine_dead"
    # Publishing and everything else
    PUBLISH_FAILED = "publish_failed"
    REBALANCE_FAILED = "rebalance_failed"
    CONFIG_INVALID = "config_invalid"
    BROKER_UNAVAILABLE = "broker_unavailable"
    INTERNAL = "internal"


class CaptionflowError(Exception):
    """Root of every captionflow error.

    ``code`` is stable and machine-readable; ``retriable`` says whether trying the same
    work again may succeed (a timeout may; a corrupt file never will).
    """

    code: ErrorCode = ErrorCode.INTERNAL
    retriable: bool = False

    def __init__(self, message: str, *, code: ErrorCode | None = None,
                 retriable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retriable is not None:
            self.retriable = retriable

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class ConfigError(CaptionflowError):
    """Settings that cannot work together; the message says what to change."""

    code = ErrorCode.CONFIG_INVALID


class BrokerUnavailableError(CaptionflowError):
    code = ErrorCode.BROKER_UNAVAILABLE
    retriable = True


# --- per-event errors: they fail one event, which becomes a dead-letter event -------------


class EventError(CaptionflowError):
    """An error that fails one event and leaves the worker running."""


class MalformedJsonError(EventError):
    code = ErrorCode.MALFORMED_JSON


class SchemaInvalidError(EventError):
    code = ErrorCode.SCHEMA_INVALID


class PayloadTooLargeError(EventError):
    code = ErrorCode.PAYLOAD_TOO_LARGE


class VideoNotFoundError(EventError):
    code = ErrorCode.VIDEO_NOT_FOUND


class VideoForbiddenError(EventError):
    code = ErrorCode.VIDEO_FORBIDDEN


class VideoTooLargeError(EventError):
    code = ErrorCode.VIDEO_TOO_LARGE


class FetchTimeoutError(EventError):
    code = ErrorCode.FETCH_TIMEOUT
    retriable = True


class FetchFailedError(EventError):
    code = ErrorCode.FETCH_FAILED
    retriable = True


class VideoUnreadableError(EventError):
    code = ErrorCode.VIDEO_UNREADABLE


class VideoEmptyError(EventError):
    code = ErrorCode.VIDEO_EMPTY


class VideoTooLongError(EventError):
    code = ErrorCode.VIDEO_TOO_LONG


class PromptTooLongError(EventError):
    code = ErrorCode.PROMPT_TOO_LONG


class InvalidRequestError(EventError):
    code = ErrorCode.INVALID_REQUEST


class EngineOverloadedError(EventError):
    code = ErrorCode.ENGINE_OVERLOADED
    retriable = True


class EngineRequestFailedError(EventError):
    """The engine failed one request for a reason that is not known to be permanent."""

    code = ErrorCode.ENGINE_FAILED
    retriable = True


# --- fatal errors: the worker stops, commits nothing unfinished, exits non-zero ------------


class FatalError(CaptionflowError):
    """The process cannot go on; an orchestrator should restart it."""


class EngineDeadError(FatalError):
    code = ErrorCode.ENGINE_DEAD


class PublishFailedError(FatalError):
    """A produced record was not acknowledged; its offset must not be committed."""

    code = ErrorCode.PUBLISH_FAILED
    retriable = True


class RebalanceFailedError(FatalError):
    """A partition handover could not be completed cleanly (drain or commit on revoke)."""

    code = ErrorCode.REBALANCE_FAILED


class InternalError(CaptionflowError):
    code = ErrorCode.INTERNAL
