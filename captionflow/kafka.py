"""aiokafka clients built from settings, started so that a failure names its cause.

aiokafka's bootstrap logs why each server failed and then raises a bare "Unable to
bootstrap"; an idempotent producer against a cluster without producer ids raises a bare
``UnknownError``. :func:`start_error` turns any start-up failure into one of: broker
unreachable (:class:`BrokerUnavailableError`, a dependency error), or a configuration error
naming the setting to change (idempotence unsupported, authentication failed, authorization
denied, TLS failure).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka import errors as kerr
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import collect_hosts, create_conn
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context

from captionflow.config import KafkaSettings
from captionflow.errors import (
    BrokerAuthenticationError,
    BrokerAuthorizationError,
    BrokerIdempotenceUnsupportedError,
    BrokerTlsError,
    BrokerUnavailableError,
    CaptionflowError,
    ConfigError,
    DependencyState,
)

log = logging.getLogger(__name__)

# What a cluster without producer ids answers to InitProducerId: Tansu sends UnknownError,
# brokers older than 0.11 do not know the request.
_NO_PRODUCER_IDS = (kerr.UnknownError, kerr.UnsupportedVersionError)
_AUTHENTICATION = (kerr.SaslAuthenticationFailed, kerr.UnsupportedSaslMechanismError,
                   kerr.IllegalSaslStateError, kerr.AuthenticationFailedError,
                   kerr.AuthenticationMethodNotSupported)
_UNREACHABLE = (KafkaConnectionError, OSError, TimeoutError, kerr.NodeNotReadyError,
                kerr.RequestTimedOutError, kerr.KafkaTimeoutError)
_START_ERRORS = (KafkaError, OSError, TimeoutError)
# Bootstrap strings of clusters that refused producer ids in this process (warned once).
_without_idempotence: set[str] = set()


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
                  idempotent: bool | None = None, **extra: Any) -> AIOKafkaProducer:
    """An unstarted producer; ``idempotent`` None means on unless the setting is false."""
    acks: int | str = "all" if kafka.acks == "all" else int(kafka.acks)
    if idempotent is None:
        idempotent = kafka.enable_idempotence is not False
    return AIOKafkaProducer(
        **connection_kwargs(kafka, client_suffix=client_suffix),
        acks=acks,
        enable_idempotence=idempotent,
        max_request_size=kafka.max_request_size_bytes,
        linger_ms=extra.pop("linger_ms", 5),
        **extra)


async def start_producer(kafka: KafkaSettings, *, client_suffix: str) -> AIOKafkaProducer:
    """A started producer, or the error that names why not (:func:`start_error`).

    With ``kafka.enable_idempotence`` auto, a cluster that cannot give producer ids gets one
    warning per process and a producer without idempotence.
    """
    auto = kafka.enable_idempotence == "auto"
    idempotent = kafka.enable_idempotence is True or (
        auto and kafka.bootstrap_servers not in _without_idempotence)
    producer = make_producer(kafka, client_suffix=client_suffix, idempotent=idempotent)
    try:
        # In auto mode aiokafka's own error line about InitProducerId is not news.
        with _muted("aiokafka.producer.sender") if auto else nullcontext():
            await producer.start()
    except _START_ERRORS as e:
        await producer.stop()
        if auto and idempotent and isinstance(e, _NO_PRODUCER_IDS):
            _without_idempotence.add(kafka.bootstrap_servers)
            log.warning(
                "Kafka at %s cannot give producers an id (InitProducerId answered %s), so "
                "captionflow produces without idempotence there: a retried send may be "
                "duplicated (the event id lets consumers drop it). Set kafka.enable_idempotence="
                "false to say so and silence this; true makes it a start-up error",
                kafka.bootstrap_servers, _describe(e))
            return await start_producer(kafka, client_suffix=client_suffix)
        raise await start_error(e, kafka, client="producer", idempotent=idempotent) from e
    return producer


def make_consumer(kafka: KafkaSettings, *topics: str, client_suffix: str = "-consumer",
                  **extra: Any) -> AIOKafkaConsumer:
    extra.setdefault("fetch_max_bytes", max(52_428_800, kafka.max_event_bytes * 2))
    extra.setdefault("max_partition_fetch_bytes", max(1_048_576, kafka.max_event_bytes + 1024))
    return AIOKafkaConsumer(*topics, **connection_kwargs(kafka, client_suffix=client_suffix),
                            **extra)


async def start_client(client: AIOKafkaConsumer | AIOKafkaAdminClient, kafka: KafkaSettings,
                       *, role: str, timeout_s: float | None = None) -> None:
    """Start a consumer or admin client; on failure close it and raise the error that names
    the cause (:func:`start_error`). ``role`` is how the message calls it ("consumer")."""
    try:
        if timeout_s is None:
            await client.start()
        else:
            await asyncio.wait_for(client.start(), timeout_s)
    except _START_ERRORS as e:
        if isinstance(client, AIOKafkaAdminClient):
            await client.close()
        else:
            await client.stop()
        raise await start_error(e, kafka, client=role) from e


async def start_error(error: BaseException, kafka: KafkaSettings, *, client: str,
                      idempotent: bool = False) -> CaptionflowError:
    """The captionflow error for a client's failed ``start()``.

    A failed bootstrap hides each server's own answer in aiokafka's log, so the servers
    are dialled once more to find it (refused, TLS, SASL). ``idempotent`` says whether the
    failed client was an idempotent producer.
    """
    cause = error
    if isinstance(error, (KafkaConnectionError, TimeoutError)):
        cause = await probe_bootstrap(kafka) or error
    return classify_start_error(cause, kafka, client=client, idempotent=idempotent)


async def probe_bootstrap(kafka: KafkaSettings, *, timeout_s: float = 5.0
                          ) -> BaseException | None:
    """Connect to each bootstrap server as a client would (TLS, ApiVersions, SASL); return
    the most telling failure, or None if one server answered."""
    kw = connection_kwargs(kafka, client_suffix="-probe")
    failures: list[BaseException] = []
    for host, port, _family in collect_hosts(kafka.bootstrap_servers, randomize=False):
        try:
            conn = await asyncio.wait_for(create_conn(
                host, port, client_id=kw["client_id"],
                request_timeout_ms=kafka.request_timeout_ms,
                ssl_context=kw.get("ssl_context"), security_protocol=kafka.security_protocol,
                sasl_mechanism=kw.get("sasl_mechanism"),
                sasl_plain_username=kw.get("sasl_plain_username"),
                sasl_plain_password=kw.get("sasl_plain_password")), timeout_s)
        except (KafkaError, OSError, TimeoutError, ValueError) as e:
            failures.append(e)
            continue
        conn.close()
        return None
    # A refusal of our settings says more than "cannot connect" to another server.
    return min(failures, key=lambda e: 1 if isinstance(e, _UNREACHABLE) and
               not isinstance(e, ssl.SSLError) else 0, default=None)


def classify_start_error(cause: BaseException, kafka: KafkaSettings, *, client: str,
                         idempotent: bool = False) -> CaptionflowError:
    """Map an aiokafka/socket failure to the captionflow error naming what to change."""
    where = f"Kafka at {kafka.bootstrap_servers}"
    what = _describe(cause)
    if isinstance(cause, ssl.SSLError):
        return BrokerTlsError(
            f"TLS with {where} failed for the {client} ({what}); check kafka.ssl_cafile (the "
            "CA that signed the brokers' certificates), kafka.ssl_certfile and "
            f"kafka.ssl_keyfile, and that kafka.security_protocol={kafka.security_protocol} "
            "matches the listener")
    # SCRAM raises ValueError when the server's nonce or signature does not match.
    if isinstance(cause, _AUTHENTICATION) or (
            isinstance(cause, ValueError) and kafka.sasl_mechanism is not None):
        return BrokerAuthenticationError(
            f"{where} refused the {client}'s authentication ({what}); check "
            f"kafka.sasl_mechanism ({kafka.sasl_mechanism}), kafka.sasl_username and "
            f"kafka.sasl_password, and kafka.security_protocol ({kafka.security_protocol})")
    denied = _authorization_fix(cause, kafka, client)
    if denied is not None:
        return BrokerAuthorizationError(f"{where} denied the {client} {denied[0]} ({what}); "
                                        f"{denied[1]}")
    # An idempotent producer's start() is bootstrap, then InitProducerId; bootstrap only
    # raises connection errors, so a broker's answer here is the producer-id refusal.
    if idempotent and isinstance(cause, kerr.BrokerResponseError):
        return BrokerIdempotenceUnsupportedError(
            f"{where} cannot give the producer an id for idempotence (InitProducerId "
            f"answered {what}) and kafka.enable_idempotence is true; set it to auto "
            "(idempotent where the cluster can) or false "
            "(CAPTIONFLOW_KAFKA__ENABLE_IDEMPOTENCE)")
    if isinstance(cause, _UNREACHABLE):
        return BrokerUnavailableError(
            f"{where} is unreachable from the {client} ({what}{_unreachable_hint(cause)}); "
            "check kafka.bootstrap_servers (--bootstrap-servers) and that the broker is up"
            + ("; `captionflow broker` runs one there"
               if kafka.bootstrap_servers == "127.0.0.1:9092" else ""))
    return BrokerUnavailableError(
        f"the {client} could not start against {where} ({what}); check "
        "kafka.bootstrap_servers and the broker's log")


def _authorization_fix(cause: BaseException, kafka: KafkaSettings,
                       client: str) -> tuple[str, str] | None:
    who = f"the principal {kafka.sasl_username!r}" if kafka.sasl_username else \
        "this client's principal"
    if isinstance(cause, kerr.TopicAuthorizationFailedError):
        return ("access to a topic", f"grant {who} Describe/Read/Write on topics.input, "
                "topics.output and topics.dead_letter, or set those to topics it may use")
    if isinstance(cause, kerr.GroupAuthorizationFailedError):
        return ("the consumer group", f"grant {who} Read on the group (worker.group_id, "
                "or --group), or choose a group it may use")
    if isinstance(cause, kerr.ClusterAuthorizationFailedError):
        if client == "producer":
            return ("idempotent writes", f"grant {who} IdempotentWrite on the cluster, or "
                    "set kafka.enable_idempotence=false")
        return ("a cluster operation", f"grant {who} Create on the cluster, or create the "
                "topics yourself (topics.*)")
    if isinstance(cause, kerr.TransactionalIdAuthorizationFailed):
        return ("its transactional id", f"grant {who} Write on the transactional id")
    return None


def _unreachable_hint(cause: BaseException) -> str:
    if isinstance(cause, ConnectionRefusedError):
        return ": nothing listens there"
    if isinstance(cause, socket.gaierror):
        return ": the host name does not resolve"
    if isinstance(cause, TimeoutError | kerr.KafkaTimeoutError | kerr.RequestTimedOutError):
        return ": no answer in time (firewall, wrong port, or a TLS listener: " \
               "kafka.security_protocol)"
    if isinstance(cause, KafkaConnectionError) and "closed" in str(cause):
        return ": it hung up on the first request; a TLS or SASL listener needs " \
               "kafka.security_protocol"
    return ""


def _describe(e: BaseException) -> str:
    name, text = type(e).__name__, str(e).strip()
    if not text or text == name:
        return name
    return text if text.startswith(name) else f"{name}: {text}"


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextmanager
def _muted(logger_name: str) -> Iterator[None]:
    target, drop = logging.getLogger(logger_name), _DropAll()
    target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)


async def ensure_topics(kafka: KafkaSettings, names: Iterable[str], *, partitions: int,
                        replication_factor: int = 1, timeout_s: float = 30.0) -> list[str]:
    """Create the topics that do not exist yet; return the names created."""
    admin = AIOKafkaAdminClient(**connection_kwargs(kafka, client_suffix="-admin"))
    await start_client(admin, kafka, role="admin client", timeout_s=timeout_s)
    try:
        existing = set(await admin.list_topics())
        wanted = [n for n in dict.fromkeys(names) if n not in existing]
        if not wanted:
            return []
        try:
            response = await admin.create_topics(
                [NewTopic(n, num_partitions=partitions, replication_factor=replication_factor)
                 for n in wanted], timeout_ms=int(timeout_s * 1000))
        except TopicAlreadyExistsError:
            return wanted
        for topic, code, *_ in getattr(response, "topic_errors", ()):
            error_type = kerr.for_code(code)
            if error_type not in (kerr.NoError, TopicAlreadyExistsError):
                raise classify_start_error(error_type(topic), kafka, client="admin client")
        return wanted
    except KafkaError as e:
        raise BrokerUnavailableError(f"creating topics {list(names)} failed: {e}") from e
    finally:
        await admin.close()


# Refusals of this client's identity by a running cluster: a configuration outage (the
# worker waits, not ready, naming the settings), never a record's fault.
_REFUSED_AT_RUN_TIME = (kerr.TopicAuthorizationFailedError, kerr.GroupAuthorizationFailedError,
                        kerr.ClusterAuthorizationFailedError, kerr.SaslAuthenticationFailed,
                        kerr.AuthenticationFailedError, kerr.TransactionalIdAuthorizationFailed)


def refusal(e: BaseException, what: str) -> BrokerUnavailableError | None:
    """``e`` as a *misconfigured* broker outage when it refuses this client's credentials
    or ACLs while running, else None."""
    if not isinstance(e, _REFUSED_AT_RUN_TIME):
        return None
    return BrokerUnavailableError(
        f"{what} refused: {_describe(e)}; check kafka.sasl_username/kafka.sasl_password and "
        "that the principal may read topics.input, write topics.output and "
        "topics.dead_letter, and use worker.group_id", state=DependencyState.MISCONFIGURED)


async def check_topics(kafka: KafkaSettings, topics: dict[str, str], *,
                       timeout_s: float = 30.0) -> None:
    """Raise ConfigError naming each of ``topics`` ({setting: name}) the cluster does not
    have. It asks for the metadata of all topics, a request that never creates one (a
    metadata request naming a topic may, where ``auto.create.topics.enable`` is on), so a
    typo in a setting cannot create a topic that nobody reads."""
    admin = AIOKafkaAdminClient(**connection_kwargs(kafka, client_suffix="-admin"))
    await start_client(admin, kafka, role="admin client", timeout_s=timeout_s)
    try:
        existing = set(await admin.list_topics())
    except KafkaError as e:
        raise BrokerUnavailableError(f"listing the topics of Kafka at "
                                     f"{kafka.bootstrap_servers} failed: {e!r}") from e
    finally:
        await admin.close()
    missing = [f"{setting}={name!r}" for setting, name in topics.items() if name not in existing]
    if missing:
        raise ConfigError(
            f"Kafka at {kafka.bootstrap_servers} has no topic {', '.join(missing)} (or this "
            "principal may not Describe it); create it (`captionflow topics` creates all "
            "three) or set the setting to an existing topic")


async def wait_for_broker(kafka: KafkaSettings, *, timeout_s: float = 20.0) -> None:
    """Return once the cluster answers a metadata request."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last: Exception | None = None
    while loop.time() < deadline:
        admin = AIOKafkaAdminClient(**connection_kwargs(kafka, client_suffix="-probe"))
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
