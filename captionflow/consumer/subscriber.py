"""Reading the caption (and dead-letter) topics: JSONL out, for people and scripts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import ConsumerRecord

from captionflow.config import KafkaSettings
from captionflow.kafka import connection_kwargs, make_consumer, start_client

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SubscribeResult:
    records: int
    timed_out: bool


async def subscribe(kafka: KafkaSettings, topics: Sequence[str], *,
                    sink: Callable[[ConsumerRecord[bytes, bytes]], None],
                    from_beginning: bool = True, count: int | None = None,
                    timeout_s: float | None = None, group_id: str | None = None,
                    ) -> SubscribeResult:
    """Hand each record of ``topics`` to ``sink`` until ``count`` records or ``timeout_s``.

    Without ``group_id`` every partition is read directly and nothing is committed; with
    one, the consumer joins that group and commits each record once ``sink`` returned.
    """
    reset = "earliest" if from_beginning else "latest"
    if group_id is None:
        consumer = make_consumer(kafka, client_suffix="-subscriber", enable_auto_commit=False,
                                 auto_offset_reset=reset)
    else:
        consumer = make_consumer(kafka, *topics, client_suffix="-subscriber", group_id=group_id,
                                 enable_auto_commit=False, auto_offset_reset=reset)
    await start_client(consumer, kafka, role="subscriber")
    seen = 0
    try:
        if group_id is None:
            await assign_all(consumer, kafka, topics, from_beginning=from_beginning)
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while count is None or seen < count:
            wait_ms = 500
            if deadline is not None:
                left = deadline - loop.time()
                if left <= 0:
                    return SubscribeResult(seen, timed_out=True)
                wait_ms = max(1, min(wait_ms, int(left * 1000)))
            limit = None if count is None else count - seen
            batches = await consumer.getmany(timeout_ms=wait_ms, max_records=limit)
            for tp, records in batches.items():
                for record in records:
                    sink(record)
                    seen += 1
                if group_id is not None and records:
                    await consumer.commit({tp: records[-1].offset + 1})
        return SubscribeResult(seen, timed_out=False)
    finally:
        await consumer.stop()


async def topic_partitions(kafka: KafkaSettings, topics: Sequence[str]) -> list[TopicPartition]:
    """Every partition of ``topics``, asked of the cluster now (a consumer's metadata cache
    only knows the topics it subscribed to, or knew when it started)."""
    admin = AIOKafkaAdminClient(**connection_kwargs(kafka, client_suffix="-describe"))
    await start_client(admin, kafka, role="admin client")
    try:
        described = await admin.describe_topics(list(topics))
    finally:
        await admin.close()
    found = {t["topic"]: sorted(p["partition"] for p in t["partitions"]) for t in described}
    return [TopicPartition(topic, p) for topic in topics for p in found.get(topic, [])]


async def assign_all(consumer: AIOKafkaConsumer, kafka: KafkaSettings, topics: Sequence[str],
                     *, from_beginning: bool) -> None:
    partitions = await topic_partitions(kafka, topics)
    consumer.assign(partitions)
    if from_beginning:
        await consumer.seek_to_beginning(*partitions)
    else:
        await consumer.seek_to_end(*partitions)
