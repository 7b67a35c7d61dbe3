import os
import signal
import socket
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


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux")
def test_tansu_does_not_outlive_a_killed_cli_broker() -> None:
    from captionflow.broker import port_free

    proc = subprocess.Popen(
        [sys.executable, "-m", "captionflow", "broker", "--port", "0", "--partitions", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        assert line.startswith("bootstrap servers: 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        [tansu] = _children(proc.pid)
        assert not _gone(tansu) and not port_free("127.0.0.1", port)
        proc.kill()  # SIGKILL: no handler, no cleanup runs in the CLI
        proc.wait(timeout=5)
        deadline = time.monotonic() + 5
        while not (_gone(tansu) and port_free("127.0.0.1", port)):
            assert time.monotonic() < deadline, "tansu outlived its parent"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.communicate()


def test_cli_broker_on_a_taken_port_says_so_and_offers_port_0() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        got = subprocess.run(
            [sys.executable, "-m", "captionflow", "broker", "--port", str(port)],
            capture_output=True, text=True, timeout=30)
    assert got.returncode == 1
    assert f"port {port} on 127.0.0.1 is taken" in got.stderr and "--port 0" in got.stderr


def test_cli_broker_defaults_to_the_port_the_other_commands_use() -> None:
    # 9092, as test_walkthrough.py: tests/support/scheduling.py runs both on one xdist worker.
    from captionflow.broker import port_free

    if not port_free("127.0.0.1", 9092):
        pytest.skip("127.0.0.1:9092 is in use by something else")
    proc = subprocess.Popen(
        [sys.executable, "-m", "captionflow", "broker", "--partitions", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("CAPTIONFLOW_")})
    try:
        line = proc.stdout.readline()
        assert line == f"bootstrap servers: {KafkaSettings().bootstrap_servers}\n", \
            line + proc.stderr.read()
        ends = run_sync(end_offsets(KafkaSettings(), "captionflow.videos"))
        assert ends == {0: 0}
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=10)
    assert "the other commands find it with their default settings" in stderr
    assert "ENABLE_IDEMPOTENCE" not in stderr
