"""One embedded broker per test session; fresh topics and a fresh group per test."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator

import pytest

from captionflow.broker import EmbeddedBroker, run_sync
from captionflow.config import KafkaSettings, TopicSettings
from captionflow.kafka import ensure_topics

_counter = itertools.count()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=log) as b:
        yield b


@pytest.fixture
def kafka(broker: EmbeddedBroker) -> KafkaSettings:
    return broker.kafka_settings()


def unique_name(request: pytest.FixtureRequest, kind: str) -> str:
    test = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:60].strip("-")
    return f"{kind}-{next(_counter)}-{test}"


@pytest.fixture
def topics(request: pytest.FixtureRequest, kafka: KafkaSettings) -> TopicSettings:
    """Three new topics with 4 partitions, named after the test."""
    base = unique_name(request, "t")
    t = TopicSettings(input=f"{base}.in", output=f"{base}.out", dead_letter=f"{base}.dlq",
                      partitions=4)
    run_sync(ensure_topics(kafka, (t.input, t.output, t.dead_letter), partitions=t.partitions))
    return t


@pytest.fixture
def group_id(request: pytest.FixtureRequest) -> str:
    return unique_name(request, "g")
