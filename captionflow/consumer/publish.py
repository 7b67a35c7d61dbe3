"""Publishing caption and dead-letter events; a record counts as done only once the broker
acknowledged its output."""

from __future__ import annotations

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.structs import RecordMetadata

from captionflow.config import KafkaSettings
from captionflow.errors import PublishFailedError
from captionflow.kafka import start_producer


class OutputPublisher:
    def __init__(self, kafka: KafkaSettings) -> None:
        self._kafka = kafka
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        self._producer = await start_producer(self._kafka, client_suffix="-worker-producer")

    async def send(self, topic: str, key: str, value: bytes) -> RecordMetadata:
        """Send and wait for the acknowledgement; raise PublishFailedError if there is none."""
        assert self._producer is not None, "OutputPublisher not started"
        try:
            return await self._producer.send_and_wait(topic, value, key=key.encode())
        except KafkaError as e:
            raise PublishFailedError(
                f"{topic}: record for event {key} not acknowledged: {e!r}") from e

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
