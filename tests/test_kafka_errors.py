"""Kafka start-up failures name their cause: unreachable, idempotence unsupported,
authentication, authorization, TLS. Caused for real where this machine can (a closed port,
Tansu refusing producer ids, a TLS listener with an untrusted certificate); SASL and ACL
refusals are mapped from aiokafka's exception types (Tansu has neither, docs/broker.md)."""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka import errors as kerr

import captionflow.kafka as ck
from captionflow.broker import free_port
from captionflow.config import KafkaSettings, TopicSettings
from captionflow.errors import (
    BrokerAuthenticationError,
    BrokerAuthorizationError,
    BrokerIdempotenceUnsupportedError,
    BrokerTlsError,
    BrokerUnavailableError,
    ErrorCode,
    ErrorKind,
)
from captionflow.kafka import (
    classify_start_error,
    ensure_topics,
    make_consumer,
    start_client,
    start_producer,
)
from tests.support.kafka_helpers import read_topic


def _env() -> dict[str, str]:
    """The caller's environment without any captionflow setting."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONFLOW_")}


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "captionflow", *args], capture_output=True,
                          text=True, env=env or _env(), timeout=60)


@pytest.fixture
def fresh_idempotence_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ck, "_without_idempotence", set())


# --- idempotence: auto falls back once, true fails naming the setting ---------------------


def test_cli_publish_with_defaults_works_against_tansu(kafka: KafkaSettings,
                                                       topics: TopicSettings,
                                                       tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"the publisher does not decode")
    got = _cli("publish", "--bootstrap-servers", kafka.bootstrap_servers,
               "--topic", topics.input, str(clip))
    assert got.returncode == 0, got.stderr
    assert "sent 1, rejected 0" in got.stderr
    # One warning that says why, naming the setting; not aiokafka's error line.
    assert got.stderr.count("cannot give producers an id") == 1
    assert "kafka.enable_idempotence" in got.stderr
    assert "ERROR" not in got.stderr and "Traceback" not in got.stderr
    records = asyncio.run(read_topic(kafka, topics.input, expected=1))
    assert len(records) == 1


async def test_auto_idempotence_warns_once_per_cluster(
        kafka: KafkaSettings, topics: TopicSettings, fresh_idempotence_memory: None,
        caplog: pytest.LogCaptureFixture) -> None:
    auto = kafka.model_copy(update={"enable_idempotence": "auto"})
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            producer = await start_producer(auto, client_suffix="-test")
            try:
                assert producer._txn_manager is None  # no idempotence on this cluster
                await producer.send_and_wait(topics.input, b"{}")
            finally:
                await producer.stop()
    warnings = [r for r in caplog.records if "cannot give producers an id" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].name == "captionflow.kafka"
    # aiokafka's own line about InitProducerId is not shown in auto mode.
    assert not [r for r in caplog.records if r.name.startswith("aiokafka")]


async def test_explicit_idempotence_on_tansu_is_a_config_error(
        kafka: KafkaSettings, fresh_idempotence_memory: None) -> None:
    required = kafka.model_copy(update={"enable_idempotence": True})
    with pytest.raises(BrokerIdempotenceUnsupportedError) as info:
        await start_producer(required, client_suffix="-test")
    e = info.value
    assert e.code is ErrorCode.BROKER_IDEMPOTENCE_UNSUPPORTED and e.kind is ErrorKind.FATAL
    assert "kafka.enable_idempotence" in e.message and "auto" in e.message


def test_cli_explicit_idempotence_exits_2(kafka: KafkaSettings, tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"x")
    got = _cli("publish", "--bootstrap-servers", kafka.bootstrap_servers, str(clip),
               env={**_env(), "CAPTIONFLOW_KAFKA__ENABLE_IDEMPOTENCE": "true"})
    assert got.returncode == 2, got.stderr
    assert "[broker_idempotence_unsupported]" in got.stderr
    assert "kafka.enable_idempotence" in got.stderr


# --- unreachable: a closed port says so, for every kind of client -------------------------


def test_cli_publish_and_subscribe_to_a_closed_port_say_unreachable(tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"x")
    nowhere = f"127.0.0.1:{free_port()}"
    for got in (_cli("publish", "--bootstrap-servers", nowhere, str(clip)),
                _cli("subscribe", "--bootstrap-servers", nowhere, "--count", "1")):
        assert got.returncode == 1, got.stderr
        assert "[broker_unavailable]" in got.stderr and "unreachable" in got.stderr
        assert "nothing listens there" in got.stderr
        assert "kafka.bootstrap_servers" in got.stderr
        assert "unknown" not in got.stderr.lower() and "Traceback" not in got.stderr


async def test_consumer_and_admin_on_a_closed_port_say_unreachable() -> None:
    nowhere = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}")
    consumer = make_consumer(nowhere, "t", group_id="g")
    with pytest.raises(BrokerUnavailableError, match="unreachable from the consumer"):
        await start_client(consumer, nowhere, role="consumer")
    with pytest.raises(BrokerUnavailableError, match="unreachable from the admin client"):
        await ensure_topics(nowhere, ["t"], partitions=1, timeout_s=5)


# --- TLS: a real handshake with a certificate the client does not trust --------------------


@pytest.fixture
async def tls_listener(tmp_path: Path) -> AsyncIterator[int]:
    """A TLS server on loopback with a self-signed certificate; it answers nothing."""
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(64)
        except (OSError, ssl.SSLError):
            pass
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_untrusted_certificate_is_a_tls_error(tls_listener: int) -> None:
    tls = KafkaSettings(bootstrap_servers=f"127.0.0.1:{tls_listener}", security_protocol="SSL",
                        request_timeout_ms=5000)
    with pytest.raises(BrokerTlsError) as info:
        await start_producer(tls, client_suffix="-test")
    assert info.value.code is ErrorCode.BROKER_TLS_FAILED
    assert "CERTIFICATE_VERIFY_FAILED" in info.value.message
    assert "kafka.ssl_cafile" in info.value.message


async def test_plaintext_client_on_a_tls_listener_points_at_security_protocol(
        tls_listener: int) -> None:
    plain = KafkaSettings(bootstrap_servers=f"127.0.0.1:{tls_listener}",
                          request_timeout_ms=5000)
    consumer = make_consumer(plain)
    with pytest.raises(BrokerUnavailableError) as info:
        await start_client(consumer, plain, role="consumer")
    assert "unreachable" in info.value.message
    assert "kafka.security_protocol" in info.value.message


# --- SASL and ACL refusals: aiokafka's types, mapped ------------------------------------


SASL = KafkaSettings(bootstrap_servers="k1:9093", security_protocol="SASL_SSL",
                     sasl_mechanism="SCRAM-SHA-512", sasl_username="captioner",
                     sasl_password="secret")


@pytest.mark.parametrize("cause", [
    kerr.SaslAuthenticationFailed("Authentication failed during authentication due to "
                                  "invalid credentials with SASL mechanism SCRAM-SHA-512"),
    kerr.UnsupportedSaslMechanismError("Kafka broker does not support SCRAM-SHA-512 sasl "
                                       "mechanism. Enabled mechanisms are: ['PLAIN']"),
    kerr.IllegalSaslStateError(), kerr.AuthenticationFailedError(),
    kerr.AuthenticationMethodNotSupported(),
    ValueError("Server sent wrong signature!"),  # SCRAM: wrong password
])
def test_sasl_refusals_are_authentication_errors(cause: BaseException) -> None:
    e = classify_start_error(cause, SASL, client="consumer")
    assert isinstance(e, BrokerAuthenticationError)
    assert e.code is ErrorCode.BROKER_AUTHENTICATION_FAILED and e.kind is ErrorKind.FATAL
    for setting in ("kafka.sasl_mechanism", "kafka.sasl_username", "kafka.sasl_password"):
        assert setting in e.message


@pytest.mark.parametrize(("cause", "client", "names"), [
    (kerr.TopicAuthorizationFailedError(), "producer", "topics.input"),
    (kerr.GroupAuthorizationFailedError(), "consumer", "worker.group_id"),
    (kerr.ClusterAuthorizationFailedError(), "producer", "kafka.enable_idempotence=false"),
    (kerr.ClusterAuthorizationFailedError(), "admin client", "Create on the cluster"),
    (kerr.TransactionalIdAuthorizationFailed(), "producer", "transactional id"),
])
def test_acl_refusals_are_authorization_errors(cause: BaseException, client: str,
                                               names: str) -> None:
    e = classify_start_error(cause, SASL, client=client, idempotent=True)
    assert isinstance(e, BrokerAuthorizationError)
    assert e.code is ErrorCode.BROKER_AUTHORIZATION_FAILED and e.kind is ErrorKind.FATAL
    assert names in e.message and "'captioner'" in e.message


def test_connection_failures_are_dependency_errors() -> None:
    for cause, hint in [
        (ConnectionRefusedError(111, "Connect call failed"), "nothing listens there"),
        (socket.gaierror(-2, "Name or service not known"), "does not resolve"),
        (TimeoutError(), "no answer in time"),
    ]:
        e = classify_start_error(cause, SASL, client="producer")
        assert isinstance(e, BrokerUnavailableError) and e.kind is ErrorKind.DEPENDENCY
        assert "unreachable" in e.message and hint in e.message


def test_tls_error_is_not_taken_for_unreachable() -> None:
    cause = ssl.SSLCertVerificationError(1, "certificate verify failed")
    assert isinstance(classify_start_error(cause, SASL, client="producer"), BrokerTlsError)


def test_a_broker_answer_is_an_idempotence_refusal_only_for_an_idempotent_producer() -> None:
    assert isinstance(classify_start_error(kerr.UnknownError(), SASL, client="producer",
                                           idempotent=True), BrokerIdempotenceUnsupportedError)
    plain = classify_start_error(kerr.UnknownError(), SASL, client="consumer")
    assert type(plain) is BrokerUnavailableError and "broker's log" in plain.message
