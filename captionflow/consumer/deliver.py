"""Delivering one record's output: publish until the broker acknowledges it. A broker outage
waits for the broker (never a dead letter); an output too large for the producer becomes a
smaller one, its dead letter."""

from __future__ import annotations

import asyncio
import logging

from aiokafka.structs import ConsumerRecord

from captionflow.config import Settings
from captionflow.consumer.dependencies import DependencyGate
from captionflow.consumer.pipeline import Output, RecordPipeline, where
from captionflow.consumer.publish import OutputPublisher
from captionflow.errors import BrokerUnavailableError, FatalError, OutputTooLargeError

log = logging.getLogger(__name__)


async def deliver(record: ConsumerRecord[bytes, bytes], output: Output, *,
                  publisher: OutputPublisher, gate: DependencyGate, pipeline: RecordPipeline,
                  settings: Settings) -> None:
    while True:
        try:
            await publisher.send(output.topic, output.key, output.value)
            return
        except BrokerUnavailableError as e:
            log.warning("%s id=%s: publish waits for the broker: %s", where(record),
                        output.event_id, e)
            if await gate.report(e):
                await asyncio.sleep(settings.worker.retry_backoff_ms / 1000)
        except OutputTooLargeError as e:
            if output.topic == settings.topics.dead_letter:
                raise FatalError(f"{where(record)}: a bounded dead-letter event was refused "
                                 f"as too large ({e}); check kafka.max_request_size_bytes "
                                 "against worker.dead_letter_payload_max_bytes") from e
            output = pipeline.dead_letter_output(record, e, output.event_id, 1)
