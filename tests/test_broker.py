import os
import signal
import subprocess
import sys
import time

import pytest

from captionflow.broker import EmbeddedBroker, run_sync
from captionflow.config import KafkaSettings
from captionflow.errors import BrokerUnavailableError
from tests.support.kafka_helpers import end_offsets


def test_session_broker_serves_created_topics(kafka: KafkaSettings, topics) -> None:
    ends = run_sync(end_offsets(kafka, topics.input))
    assert ends == {0: 0, 1: 0, 2: 0, 3: 0}


def test_taken_port_is_reported_not_hidden(broker: EmbeddedBroker) -> None:
    # Tansu panics and exits 0 when its port is taken; that must not pass as started.
    with pytest.raises(BrokerUnavailableError, match="port"):
        EmbeddedBroker(port=broker.port, start_timeout_s=2).start()
    assert broker.alive


def test_free_port_race_is_retried(broker: EmbeddedBroker, monkeypatch) -> None:
    import captionflow.broker as mod

    ports = iter([broker.port])  # first pick collides with the running broker
    real = mod.free_port
    monkeypatch.setattr(mod, "free_port", lambda host="127.0.0.1": next(ports, None) or real(host))
    with EmbeddedBroker(topics=["x"], partitions=2) as b:
        assert b.port != broker.port and b.alive
        assert run_sync(end_offsets(b.kafka_settings(), "x")) == {0: 0, 1: 0}


def test_cli_broker_prints_bootstrap_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "captionflow", "broker", "--port", "0", "--partitions", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        assert line.startswith("bootstrap servers: 127.0.0.1:"), line + proc.stderr.read()
        bootstrap = line.split()[-1]
        ends = run_sync(end_offsets(KafkaSettings(bootstrap_servers=bootstrap,
                                                  enable_idempotence=False),
                                    "captionflow.captions"))
        assert ends == {0: 0, 1: 0}
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 10
    finally:
        proc.kill()
        proc.communicate()
