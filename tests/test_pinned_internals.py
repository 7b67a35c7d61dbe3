"""Behaviour captionflow takes from its libraries' internals, pinned to the versions it was
written against, so that an upgrade that changes it fails here, by name, instead of
quietly in production:

- aiokafka 0.13.0: a fenced (lost) group member reaches ``on_partitions_revoked`` with its
  coordinator's ``generation`` reset to -1 (no public signal exists; consumer/service.py);
- aiokafka 0.13.0: ``consumer/publish.py``'s own record-size estimate equals the one the
  producer checks against ``max_request_size``;
- vLLM 0.32.0: tests/test_engine_stop.py pins the engine teardown and shared-memory cleanup
  (``serving/engine_stop.py``: ``engine_core.resources.engine_manager.processes``).
"""

from __future__ import annotations

import asyncio

import aiokafka
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener

from captionflow.consumer.publish import record_size
from captionflow.kafka import make_consumer
from tests.support.kafka_helpers import wait_until

AIOKAFKA = "0.13.0"


def test_aiokafka_is_the_pinned_version() -> None:
    assert aiokafka.__version__ == AIOKAFKA, (
        f"aiokafka {aiokafka.__version__} is not {AIOKAFKA}, the version whose internals "
        "this file pins: re-check each one below, then update AIOKAFKA")


@pytest.mark.parametrize("key", [None, b"", b"ev-1", b"k" * 300])
@pytest.mark.parametrize("value_bytes", [0, 1, 63, 64, 127, 128, 8191, 8192, 1 << 20,
                                         (1 << 21) + 5])
def test_record_size_equals_aiokafkas_estimate(key: bytes | None, value_bytes: int) -> None:
    from aiokafka.record.default_records import DefaultRecordBatchBuilder

    value = b"v" * value_bytes
    assert record_size(key, value) == DefaultRecordBatchBuilder.estimate_size_in_bytes(
        key, value, [])


class _Seen(ConsumerRebalanceListener):
    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self.consumer = consumer
        self.assigned = 0
        self.generations_at_revoke: list[int] = []

    async def on_partitions_revoked(self, revoked) -> None:
        if revoked:
            self.generations_at_revoke.append(self.consumer._coordinator.generation)

    async def on_partitions_assigned(self, assigned) -> None:
        self.assigned += 1


@pytest.mark.asyncio(loop_scope="session")
async def test_aiokafka_fenced_member_reaches_revoke_with_generation_minus_one(
        kafka, topics, group_id) -> None:
    """A member whose heartbeat is answered "unknown member" is fenced: aiokafka's
    heartbeat loop calls ``reset_generation()`` and rejoins, calling the listener's
    ``on_partitions_revoked`` on the way. The fence is caused here the way the heartbeat
    handler causes it (the broker's side of a fence cannot be timed on a shared machine)."""
    consumer = make_consumer(kafka, client_suffix="-pin", group_id=group_id,
                             enable_auto_commit=False, session_timeout_ms=6000,
                             heartbeat_interval_ms=200)
    listener = _Seen(consumer)
    consumer.subscribe([topics.input], listener=listener)
    await consumer.start()
    poll = asyncio.create_task(_poll(consumer))
    try:
        await wait_until(lambda: listener.assigned >= 1, timeout_s=30)
        assert consumer._coordinator.generation >= 0  # Tansu's first generation is 0
        consumer._coordinator.reset_generation()  # what an UnknownMemberId heartbeat does
        await wait_until(lambda: listener.generations_at_revoke, timeout_s=30)
        assert listener.generations_at_revoke[0] == -1
    finally:
        poll.cancel()
        await asyncio.gather(poll, return_exceptions=True)
        await consumer.stop()


async def _poll(consumer: AIOKafkaConsumer) -> None:
    while True:
        await consumer.getmany(timeout_ms=100)
