"""Publishing caption and dead-letter events. A record counts as done only once the broker
acknowledged its output, and every output is made to fit the producer's size limit first.

Fitting a caption event, in order, until it fits (the rules are part of the contract, in
docs/worker.md): drop the echoed ``metadata``, then the echoed ``image`` list, then the
``conversation``, then the per-window captions (their text is also in ``caption``). The
caption is never dropped; an event that still does not fit becomes an ``output_too_large``
dead letter. Dead-letter events are bounded when built (payload prefix, key, message).
"""

from __future__ import annotations

from aiokafka import AIOKafkaProducer
from aiokafka import errors as kerr
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordTooLargeError
from aiokafka.structs import RecordMetadata

from captionflow.config import KafkaSettings
from captionflow.errors import (
    BrokerUnavailableError,
    CaptionflowError,
    OutputTooLargeError,
    PublishFailedError,
)
from captionflow.kafka import refusal, start_producer
from captionflow.schemas.codec import encode
from captionflow.schemas.events import CaptionEvent

# Echoed fields a caption event may lose to fit, in the order they are dropped.
DROPPABLE_FIELDS = ("metadata", "image", "conversation", "windows")


# Kafka's record batch v2 format: the batch header, and the most a record's own fields
# (attributes, offset and timestamp deltas, length varints) add around key and value.
BATCH_HEADER_BYTES = 61
MAX_RECORD_OVERHEAD_BYTES = 21


def _varint_bytes(n: int) -> int:
    """Bytes of ``n`` as a zigzag varint, as the record format writes lengths."""
    zigzag = (n << 1) ^ (n >> 63)
    size = 1
    while zigzag >= 0x80:
        zigzag >>= 7
        size += 1
    return size


def record_size(key: bytes | None, value: bytes) -> int:
    """The size the producer checks against ``max_request_size`` for one record without
    headers: a one-record batch at its upper bound (tests/test_delivery_units.py checks it
    equals aiokafka's own estimate)."""
    fields = 1  # the header count (0)
    for part in (key, value):
        fields += _varint_bytes(-1) if part is None else _varint_bytes(len(part)) + len(part)
    return BATCH_HEADER_BYTES + MAX_RECORD_OVERHEAD_BYTES + fields


def fit_caption(event: CaptionEvent, key: str, max_bytes: int) -> tuple[bytes, list[str]]:
    """``event`` encoded within ``max_bytes`` and the echoed fields dropped to get there;
    raises OutputTooLargeError when even the caption alone does not fit."""
    key_bytes = key.encode()
    value = encode(event)
    dropped: list[str] = []
    for name in DROPPABLE_FIELDS:
        if record_size(key_bytes, value) <= max_bytes:
            break
        dropped.append(name)
        empty = {"metadata": {}, "image": None, "conversation": [], "windows": None}[name]
        event = event.model_copy(update={name: empty, "dropped_fields": list(dropped)})
        value = encode(event)
    size = record_size(key_bytes, value)
    if size > max_bytes:
        raise OutputTooLargeError(
            f"the caption event is {size} bytes without its echoed fields, above "
            f"kafka.max_request_size_bytes={max_bytes}; lower serving.max_tokens or raise the "
            "producer's and the broker's limits")
    return value, dropped


def publish_error(e: KafkaError, topic: str, key: str) -> CaptionflowError:
    """What a failed send means for the worker, by what the cluster said.

    An unknown topic is fatal ``publish_failed`` (aiokafka calls it retriable, but the
    start-up check found the topic, so it was deleted: waiting would stall every partition
    with nothing to show why). A send that timed out with its batch still queued
    (``KafkaTimeoutError``) is a broker outage; so is any other retriable error. A refusal
    of the worker's credentials or ACLs is an outage whose fix is a setting."""
    what = f"{topic}: record for event {key}"
    if isinstance(e, kerr.UnknownTopicOrPartitionError):
        return PublishFailedError(
            f"{what}: the topic does not exist ({e!r}); create it or fix topics.output / "
            "topics.dead_letter")
    refused = refusal(e, what)
    if refused is not None:
        return refused
    if e.retriable or isinstance(e, kerr.KafkaTimeoutError):
        return BrokerUnavailableError(f"{what} not acknowledged: {e!r}")
    return PublishFailedError(
        f"{what} refused: {e!r}; check the topic exists and this client may write to it")


class OutputPublisher:
    def __init__(self, kafka: KafkaSettings) -> None:
        self._kafka = kafka
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        self._producer = await start_producer(self._kafka, client_suffix="-worker-producer")

    async def send(self, topic: str, key: str, value: bytes) -> RecordMetadata:
        """Send and wait for the acknowledgement.

        Raises OutputTooLargeError when the producer refuses this record's size (one
        record's problem), BrokerUnavailableError when the cluster did not acknowledge it
        in time (an outage: retry once it answers), PublishFailedError otherwise (the
        cluster refuses every record: a deployment problem)."""
        assert self._producer is not None, "OutputPublisher not started"
        try:
            return await self._producer.send_and_wait(topic, value, key=key.encode())
        except (MessageSizeTooLargeError, RecordTooLargeError) as e:
            raise OutputTooLargeError(
                f"{topic}: record for event {key} ({len(value)} bytes) refused as too "
                f"large: {e!r}") from e
        except KafkaError as e:
            raise publish_error(e, topic, key) from e

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
