"""Every error captionflow raises, with a stable code, a ``retriable`` flag and a kind.

Codes are part of the public contract: they land in dead-letter events and in batch-mode
rows, and users alert on them. Add codes; never rename or reuse one. The table in
``docs/errors.md`` is checked against :class:`ErrorCode` and :class:`ErrorKind` by the tests.

The kind decides what a worker does with a failed record:

- ``event``: this record is bad. Retried if ``retriable``, then dead-lettered.
- ``dependency``: something the record needs is down (engine, broker, object store). Never
  the record's fault: the worker pauses, keeps the record uncommitted, probes the
  dependency and retries the record once it answers. Only a record that keeps failing
  while its dependency answers probes is dead-lettered, after ``worker.max_attempts``.
- ``fatal``: the process cannot go on (dead engine, bad settings); it exits non-zero
  without committing unfinished work, and an orchestrator restarts it.
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
    VIDEO_RESOLUTION_TOO_LARGE = "video_resolution_too_large"
    VIDEO_TOO_MANY_FRAMES = "video_too_many_frames"
    VIDEO_TOO_MANY_WINDOWS = "video_too_many_windows"
    DECODE_CRASHED = "decode_crashed"
    DECODE_OUT_OF_MEMORY = "decode_out_of_memory"
    DECODE_TIMEOUT = "decode_timeout"
    DECODE_DEVICE_UNAVAILABLE = "decode_device_unavailable"
    # Captioning
    PROMPT_TOO_LONG = "prompt_too_long"
    INVALID_REQUEST = "invalid_request"
    ENGINE_OVERLOADED = "engine_overloaded"
    ENGINE_FAILED = "engine_failed"
    ENGINE_DEAD = "engine_dead"
    ENGINE_UNAVAILABLE = "engine_unavailable"
    ENGINE_TIMEOUT = "engine_timeout"
    ENGINE_STALLED = "engine_stalled"
    # Object storage
    STORE_UNAVAILABLE = "store_unavailable"
    # Caption cache (never ends a record: the caption is made without the cache)
    CACHE_UNAVAILABLE = "cache_unavailable"
    # Publishing and everything else
    OUTPUT_TOO_LARGE = "output_too_large"
    PUBLISH_FAILED = "publish_failed"
    REBALANCE_FAILED = "rebalance_failed"
    CONFIG_INVALID = "config_invalid"
    BROKER_UNAVAILABLE = "broker_unavailable"
    BROKER_IDEMPOTENCE_UNSUPPORTED = "broker_idempotence_unsupported"
    BROKER_AUTHENTICATION_FAILED = "broker_authentication_failed"
    BROKER_AUTHORIZATION_FAILED = "broker_authorization_failed"
    BROKER_TLS_FAILED = "broker_tls_failed"
    INTERNAL = "internal"


class ErrorKind(StrEnum):
    EVENT = "event"
    DEPENDENCY = "dependency"
    FATAL = "fatal"


class Dependency(StrEnum):
    """What a dependency error is waiting for (the ``dependency`` label of
    ``captionflow_dependency_up``)."""

    ENGINE = "engine"
    BROKER = "broker"
    OBJECT_STORE = "object_store"
    CACHE = "cache"


class DependencyState(StrEnum):
    """What a dependency says about this worker, from its last answer or probe.

    ``down`` (no answer, 5xx, restarting) and ``overloaded`` (429, 503 with Retry-After,
    ``SlowDown``) are outages; ``misconfigured`` is a refusal of this worker's own
    settings (credentials, keys, ACLs: 401/403, ``InvalidAccessKeyId``, SASL/ACL errors),
    which waiting alone will not end. None of the three is ever a record's fault."""

    UP = "up"
    DOWN = "down"
    OVERLOADED = "overloaded"
    MISCONFIGURED = "misconfigured"


class CaptionflowError(Exception):
    """Root of every captionflow error.

    ``code`` is stable and machine-readable; ``retriable`` says whether trying the same
    work again may succeed (a timeout may; a corrupt file never will).
    """

    code: ErrorCode = ErrorCode.INTERNAL
    retriable: bool = False
    kind: ErrorKind = ErrorKind.EVENT

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
    kind = ErrorKind.FATAL


# The cluster answers but refuses these settings: waiting will not help, changing them will.


class BrokerIdempotenceUnsupportedError(ConfigError):
    """``kafka.enable_idempotence`` is true and the cluster cannot give producer ids."""

    code = ErrorCode.BROKER_IDEMPOTENCE_UNSUPPORTED


class BrokerAuthenticationError(ConfigError):
    """SASL authentication failed (wrong mechanism, user or password)."""

    code = ErrorCode.BROKER_AUTHENTICATION_FAILED


class BrokerAuthorizationError(ConfigError):
    """Authenticated, but an ACL denies a topic, the group or the cluster."""

    code = ErrorCode.BROKER_AUTHORIZATION_FAILED


class BrokerTlsError(ConfigError):
    """The TLS handshake failed (certificate not trusted, wrong listener, bad key)."""

    code = ErrorCode.BROKER_TLS_FAILED


# --- dependency errors: an outage, never the record's fault -------------------------------


class DependencyError(CaptionflowError):
    """A dependency is unreachable, overloaded, restarting or hung. ``dependency`` names it,
    so the worker knows which probe to run before retrying."""

    kind = ErrorKind.DEPENDENCY
    retriable = True
    dependency: Dependency = Dependency.ENGINE
    state: DependencyState = DependencyState.DOWN

    def __init__(self, message: str, *, code: ErrorCode | None = None,
                 retriable: bool | None = None, dependency: Dependency | None = None,
                 retry_after_s: float | None = None,
                 state: DependencyState | None = None) -> None:
        super().__init__(message, code=code, retriable=retriable)
        if dependency is not None:
            self.dependency = dependency
        if state is not None:
            self.state = state
        # A server's own hint (HTTP Retry-After), already capped by whoever raised this.
        self.retry_after_s = retry_after_s


class BrokerUnavailableError(DependencyError):
    code = ErrorCode.BROKER_UNAVAILABLE
    dependency = Dependency.BROKER


class EngineUnavailableError(DependencyError):
    """The serving backend does not answer: connection refused, 5xx, 503 while restarting."""

    code = ErrorCode.ENGINE_UNAVAILABLE


class EngineOverloadedError(DependencyError):
    """The serving backend refused the request for load (HTTP 429, queue full)."""

    code = ErrorCode.ENGINE_OVERLOADED
    state = DependencyState.OVERLOADED


class EngineTimeoutError(DependencyError):
    """A request passed ``serving.request_timeout_s``: a hung or saturated engine."""

    code = ErrorCode.ENGINE_TIMEOUT


class ObjectStoreUnavailableError(DependencyError):
    """The object store does not answer, throttles, or fails with 5xx."""

    code = ErrorCode.STORE_UNAVAILABLE
    dependency = Dependency.OBJECT_STORE


class CacheUnavailableError(DependencyError):
    """The caption cache's store does not answer in ``cache.timeout_ms`` or fails. Only
    the cache sees it: the caption is made without the cache, and the error is counted."""

    code = ErrorCode.CACHE_UNAVAILABLE
    dependency = Dependency.CACHE


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


class VideoResolutionTooLargeError(EventError):
    """The source picture is larger than ``video.max_source_pixels`` (header or frame)."""

    code = ErrorCode.VIDEO_RESOLUTION_TOO_LARGE


class VideoTooManyFramesError(EventError):
    """More frames or packets than ``video.max_source_frames`` / ``max_probe_packets``."""

    code = ErrorCode.VIDEO_TOO_MANY_FRAMES


class VideoTooManyWindowsError(EventError):
    """The video would be cut into more than ``video.max_windows`` windows."""

    code = ErrorCode.VIDEO_TOO_MANY_WINDOWS


class DecodeCrashedError(EventError):
    """The decoder process died (a crash in FFmpeg, or killed) while on this video. Not
    retried: a video that crashes the decoder once will crash it again."""

    code = ErrorCode.DECODE_CRASHED


class DecodeOutOfMemoryError(EventError):
    """Decoding needed more than ``video.decode_memory_limit_bytes``."""

    code = ErrorCode.DECODE_OUT_OF_MEMORY


class DecodeTimeoutError(EventError):
    """One probe or decode ran past ``video.decode_timeout_s``; its process was killed."""

    code = ErrorCode.DECODE_TIMEOUT


class PromptTooLongError(EventError):
    code = ErrorCode.PROMPT_TOO_LONG


class InvalidRequestError(EventError):
    code = ErrorCode.INVALID_REQUEST


class EngineRequestFailedError(EventError):
    """The engine failed one request for a reason that is not known to be permanent."""

    code = ErrorCode.ENGINE_FAILED
    retriable = True


# --- fatal errors: the worker stops, commits nothing unfinished, exits non-zero ------------


class OutputTooLargeError(EventError):
    """The caption event does not fit the producer's limit even without its echoed fields."""

    code = ErrorCode.OUTPUT_TOO_LARGE


class FatalError(CaptionflowError):
    """The process cannot go on; an orchestrator should restart it."""

    kind = ErrorKind.FATAL


class EngineDeadError(FatalError):
    code = ErrorCode.ENGINE_DEAD


class EngineStalledError(FatalError):
    """Requests were in flight and no token came back for ``worker.engine_stall_exit_s``."""

    code = ErrorCode.ENGINE_STALLED


class DecodeDeviceUnavailableError(FatalError):
    """``video.decode_device`` names a GPU that FFmpeg cannot open (no driver, no device,
    no NVDEC). Checked once when the worker or batch run starts, before any record."""

    code = ErrorCode.DECODE_DEVICE_UNAVAILABLE


class PublishFailedError(FatalError):
    """A produced record was not acknowledged; its offset must not be committed."""

    code = ErrorCode.PUBLISH_FAILED
    retriable = True


class RebalanceFailedError(FatalError):
    """A partition handover could not be completed cleanly (drain or commit on revoke)."""

    code = ErrorCode.REBALANCE_FAILED


class InternalError(CaptionflowError):
    code = ErrorCode.INTERNAL
