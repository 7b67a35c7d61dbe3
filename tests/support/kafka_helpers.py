"""Reading what really landed on the broker: records and committed offsets."""

from __future__ import annotations

import asyncio
import inspect

from aiokafka.structs import ConsumerRecord

from captionflow.config import KafkaSettings
from captionflow.consumer.subscriber import assign_all, topic_partitions
from captionflow.kafka import make_consumer


async def read_topic(kafka: KafkaSettings, topic: str, *, expected: int,
                     timeout_s: float = 30.0, settle_s: float = 0.5,
                     ) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of ``topic`` from the beginning: waits until ``expected`` arrived (or the
    timeout), then ``settle_s`` longer so that extra records (duplicates) are seen too."""
    consumer = make_consumer(kafka, client_suffix="-test-reader", enable_auto_commit=False,
                             auto_offset_reset="earliest")
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    try:
        await assign_all(consumer, kafka, [topic], from_beginning=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        settle_until: float | None = None
        while True:
            now = loop.time()
            if len(records) >= expected and settle_until is None:
                settle_until = now + settle_s
            if now > deadline or (settle_until is not None and now > settle_until):
                return records
            batches = await consumer.getmany(timeout_ms=100)
            for batch in batches.values():
                records.extend(batch)
    finally:
        await consumer.stop()


async def end_offsets(kafka: KafkaSettings, topic: str) -> dict[int, int]:
    """The end (high-watermark) offset of each partition.

    Read from fetch responses, not ListOffsets: Tansu 0.6 answers ListOffsets(latest) with
    one past the *base offset of the last batch*, which is wrong once a batch holds several
    records (docs/broker.md).
    """
    consumer = make_consumer(kafka, client_suffix="-test-probe", enable_auto_commit=False)
    await consumer.start()
    try:
        await assign_all(consumer, kafka, [topic], from_beginning=True)
        tps = list(consumer.assignment())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        ends: dict[int, int] = {}
        while loop.time() < deadline:
            await consumer.getmany(timeout_ms=100)
            for tp in tps:
                hw = consumer.highwater(tp)
                if hw is not None:
                    ends[tp.partition] = hw
            if len(ends) == len(tps):
                positions = [await consumer.position(tp) for tp in tps]
                if all(pos >= ends[tp.partition] for pos, tp in zip(positions, tps)):
                    return ends
        raise TimeoutError(f"could not read the end offsets of {topic}")
    finally:
        await consumer.stop()


async def committed_offsets(kafka: KafkaSettings, topic: str, group_id: str) -> dict[int, int]:
    """What ``group_id`` committed for each partition of ``topic`` (-1 if nothing)."""
    consumer = make_consumer(kafka, client_suffix="-test-probe", group_id=group_id,
                             enable_auto_commit=False)
    await consumer.start()
    try:
        out = {}
        for tp in await topic_partitions(kafka, [topic]):
            c = await consumer.committed(tp)
            out[tp.partition] = -1 if c is None else c
        return out
    finally:
        await consumer.stop()


async def wait_all_committed(kafka: KafkaSettings, topic: str, group_id: str, *,
                             timeout_s: float = 15.0) -> None:
    """Wait until ``group_id`` has committed the end offset of every partition of ``topic``
    that holds records (an empty partition has nothing to commit), or fail naming the gap."""
    ends = {p: end for p, end in (await end_offsets(kafka, topic)).items() if end > 0}
    assert ends, f"{topic} holds no records"
    committed: dict[int, int] = {}

    async def done() -> bool:
        nonlocal committed
        committed = await committed_offsets(kafka, topic, group_id)
        return all(committed.get(p) == end for p, end in ends.items())

    try:
        await wait_until(done, timeout_s=timeout_s, interval_s=0.2)
    except TimeoutError:
        raise AssertionError(f"{group_id} committed {committed} on {topic}, "
                             f"whose end offsets are {ends}") from None


async def wait_until(predicate, *, timeout_s: float = 30.0, interval_s: float = 0.1) -> None:
    """Wait until ``predicate()`` (a plain or a coroutine function) is true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s

    async def holds() -> bool:
        result = predicate()
        return bool(await result) if inspect.isawaitable(result) else bool(result)

    while not await holds():
        if loop.time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(interval_s)
