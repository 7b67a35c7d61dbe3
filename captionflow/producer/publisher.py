"""Publishing video events: validated, keyed by event id, delivery awaited."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.structs import RecordMetadata

from captionflow.config import KafkaSettings, VideoSettings
from captionflow.errors import PublishFailedError
from captionflow.kafka import start_producer
from captionflow.producer.sources import Candidate, IdFrom, Rejected, expand
from captionflow.schemas.codec import encode
from captionflow.schemas.events import VideoEvent

log = logging.getLogger(__name__)


@dataclass
class PublishReport:
    sent: list[tuple[VideoEvent, RecordMetadata]] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.rejected


class Publisher:
    """Publish VideoEvents to the input topic.

    >>> async with Publisher(kafka, topic="captionflow.videos") as pub:
    ...     report = await pub.publish_inputs(["videos/"])
    """

    def __init__(self, kafka: KafkaSettings, *, topic: str, max_in_flight: int = 1000) -> None:
        self.kafka = kafka
        self.topic = topic
        self.max_in_flight = max_in_flight
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        self._producer = await start_producer(self.kafka, client_suffix="-publisher")

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def __aenter__(self) -> Publisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send(self, event: VideoEvent) -> RecordMetadata:
        """Send one event and wait until the broker acknowledges it."""
        return await (await self._enqueue(event))

    async def _enqueue(self, event: VideoEvent) -> asyncio.Future[RecordMetadata]:
        if self._producer is None:
            raise RuntimeError("Publisher not started: use `async with Publisher(...)`")
        return await self._producer.send(self.topic, encode(event), key=event.id.encode())

    async def send_many(self, events: Iterable[VideoEvent], *,
                        on_sent: Callable[[VideoEvent, RecordMetadata], None] | None = None,
                        ) -> list[tuple[VideoEvent, RecordMetadata]]:
        """Send events with up to ``max_in_flight`` unacknowledged; raise if any failed."""
        results: list[tuple[VideoEvent, RecordMetadata]] = []
        pending: list[tuple[VideoEvent, asyncio.Future[RecordMetadata]]] = []

        async def drain() -> None:
            for ev, fut in pending:
                try:
                    meta = await fut
                except KafkaError as e:
                    raise PublishFailedError(f"event {ev.id} was not delivered: {e}") from e
                results.append((ev, meta))
                if on_sent is not None:
                    on_sent(ev, meta)
            pending.clear()

        for event in events:
            pending.append((event, await self._enqueue(event)))
            if len(pending) >= self.max_in_flight:
                await drain()
        await drain()
        return results

    async def publish_inputs(self, inputs: Iterable[str], *, id_from: IdFrom = "auto",
                             on_sent: Callable[[VideoEvent, RecordMetadata], None] | None = None,
                             on_rejected: Callable[[Rejected], None] | None = None,
                             video: VideoSettings | None = None,
                             ) -> PublishReport:
        """Expand files/folders/globs/JSON rows/``s3://`` prefixes (listed with ``video``'s
        store settings), validate each, send the valid ones."""
        report = PublishReport()

        def valid(candidates: Iterable[Candidate]) -> Iterable[VideoEvent]:
            for c in candidates:
                if c.event is not None:
                    yield c.event
                else:
                    assert c.rejected is not None
                    report.rejected.append(c.rejected)
                    log.warning("rejected %s: %s", c.rejected.source, c.rejected.reason)
                    if on_rejected is not None:
                        on_rejected(c.rejected)

        report.sent = await self.send_many(valid(expand(inputs, id_from=id_from, video=video)),
                                           on_sent=on_sent)
        return report
