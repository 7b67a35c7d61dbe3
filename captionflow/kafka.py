"""aiokafka client construction from settings: one place that knows the connection options."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context

from captionflow.config import KafkaSettings
from captionflow.errors import BrokerUnavailableError


def connection_kwargs(kafka: KafkaSettings, *, client_suffix: str = "") -> dict[str, Any]:
    """Options every aiokafka client takes: bootstrap, client id, SASL/SSL."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers,
        "client_id": kafka.client_id + client_suffix,
        "security_protocol": kafka.security_protocol,
        "request_timeout_ms": kafka.request_timeout_ms,
    }
    if kafka.security_protocol.endswith("SSL"):
        kwargs["ssl_context"] = create_ssl_context(
            cafile=str(kafka.ssl_cafile) if kafka.ssl_cafile else None,
            certfile=str(kafka.ssl_certfile) if kafka.ssl_certfile else None,
            keyfile=str(kafka.ssl_keyfile) if kafka.ssl_keyfile else None)
    if kafka.sasl_mechanism is not None:
        kwargs["sasl_mechanism"] = kafka.sasl_mechanism
        if kafka.sasl_username is not None:
            kwargs["sasl_plain_username"] = kafka.sasl_username
        if kafka.sasl_password is not None:
            kwargs["sasl_plain_password"] = kafka.sasl_password.get_secret_value()
    return kwargs


def make_producer(kafka: KafkaSettings, *, client_suffix: str = "-producer",
                  **extra: Any) -> AIOKafkaProducer:
    acks: int | str = "all" if kafka.acks == "all" else int(kafka.acks)
    return AIOKafkaProducer(
        **connection_kwargs(kafka, client_suffix=client_suffix),
        acks=acks,
        enable_idempotence=kafka.enable_idempotence,
        max_request_size=kafka.max_request_size_bytes,
        linger_ms=extra.pop("linger_ms", 5),
        **extra)


async def start_producer(kafka: KafkaSettings, *, client_suffix: str) -> AIOKafkaProducer:
    """A started producer, or BrokerUnavailableError saying which cluster did not answer."""
    producer = make_producer(kafka, client_suffix=client_suffix)
    try:
        await producer.start()
    except (KafkaError, OSError) as e:
        await producer.stop()
        raise BrokerUnavailableError(
            f"producer cannot reach Kafka at {kafka.bootstrap_servers}: {e}; check "
            "kafka.bootstrap_servers and that the broker is up") from e
    return producer


def make_consumer(kafka: KafkaSettings, *topics: str, client_suffix: str = "-consumer",
                  **extra: Any) -> AIOKafkaConsumer:
    extra.setdefault("fetch_max_bytes", max(52_428_800, kafka.max_event_bytes * 2))
    extra.setdefault("max_partition_fetch_bytes", max(1_048_576, kafka.max_event_bytes + 1024))
    return AIOKafkaConsumer(*topics, **connection_kwargs(kafka, client_suffix=client_suffix),
                            **extra)


async def ensure_topics(kafka: KafkaSettings, names: Iterable[str], *, partitions: int,
                        replication_factor: int = 1, timeout_s: float = 30.0) -> list[str]:
    """Create the topics that do not exist yet; return the names created."""
    admin = AIOKafkaAdminClient(**connection_kwargs(kafka, client_suffix="-admin"))
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
    except (KafkaConnectionError, TimeoutError) as e:
        await admin.close()
        raise BrokerUnavailableError(
            f"cannot reach Kafka at {kafka.bootstrap_servers}: {e}; check "
            "kafka.bootstrap_servers and that the broker is up") from e
    try:
        existing = set(await admin.list_topics())
        wanted = [n for n in dict.fromkeys(names) if n not in existing]
        if not wanted:
            return []
        try:
            await admin.create_topics(
                [NewTopic(n, num_partitions=partitions, replication_factor=replication_factor)
                 for n in wanted], timeout_ms=int(timeout_s * 1000))
        except TopicAlreadyExistsError:
            pass
        return wanted
    except KafkaError as e:
        raise BrokerUnavailableError(f"creating topics {list(names)} failed: {e}") from e
    finally:
        await admin.close()


async def wait_for_broker(kafka: KafkaSettings, *, timeout_s: float = 20.0) -> None:
    """Return once the cluster answers a metadata request."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last: Exception | None = None
    while loop.time() < deadline:
        admin = AIOKafkaAdminClient(**connection_kwargs(kafka, client_suffix="-probe"),
                                    )
        try:
            await asyncio.wait_for(admin.start(), max(0.1, deadline - loop.time()))
            await admin.list_topics()
            return
        except (KafkaError, OSError, TimeoutError) as e:
            last = e
            await asyncio.sleep(0.1)
        finally:
            await admin.close()
    raise BrokerUnavailableError(
        f"Kafka at {kafka.bootstrap_servers} did not answer within {timeout_s:.0f} s: {last}")
