"""A real ``vllm.entrypoints.openai.api_server`` for the tiny model, as a subprocess in its
own process group (API server + engine core), for the openai backend's tests.

Use the ``vllm_server`` fixture (one server per session, see :class:`VllmServer`) rather
than starting one: each start costs ~30 s of the suite. ``start_server`` is for a test
that needs a server with other settings."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from captionflow.config import ServingSettings
from captionflow.serving.engine_setup import vllm_server_command

READY_TIMEOUT_S = 300.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no server log)"


def start_server(settings: ServingSettings, port: int, log_path: Path,
                 cwd: Path) -> subprocess.Popen[bytes]:
    """Start the server and return once ``/health`` answers 200; fail the test (after
    stopping it) if it exits or is not ready in time. vLLM's work dirs come from the
    environment (``prepare_vllm_environment`` put them there), which the server inherits."""
    cmd = vllm_server_command(settings, host="127.0.0.1", port=port)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ),
                                start_new_session=True, cwd=cwd)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            stop(proc)
            pytest.fail(f"vLLM server exited with {proc.returncode} before it was ready:\n"
                        f"{tail(log_path)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2.0).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop(proc)
            pytest.fail(f"vLLM server not ready after {READY_TIMEOUT_S:.0f} s:\n"
                        f"{tail(log_path)}")
        time.sleep(1.0)


def kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the server's whole process group, as a crashed pod would be."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group, SIGKILL after 30 s."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    # Engine-core children may outlive the API server for a moment.
    kill(proc)


class VllmServer:
    """One ``vllm serve`` for the tiny model on a fixed loopback port. Tests may
    :meth:`kill` it (an outage) and :meth:`restart` it on the same port; the next test that
    asks for the session server gets it running again whatever the last one left."""

    def __init__(self, settings: ServingSettings, work_dir: Path) -> None:
        self.settings = settings
        self.work_dir = work_dir
        self.port = free_port()
        self.log_path = work_dir / f"vllm-server-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The OpenAI-compatible base URL (``.../v1``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the server is not running"
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart(self) -> VllmServer:
        """Start it (again) on the same port; returns once ``/health`` answers."""
        if self.running():
            return self
        self.proc = start_server(self.settings, self.port, self.log_path, self.work_dir)
        return self

    def kill(self) -> None:
        """SIGKILL its process group, as a crashed pod would be."""
        if self.proc is not None:
            kill(self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


@pytest.fixture(scope="session")
def vllm_server_session(tiny_settings, serving_work_dir: Path) -> Iterator[VllmServer]:
    server = VllmServer(tiny_settings, serving_work_dir)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def vllm_server(vllm_server_session: VllmServer) -> VllmServer:
    """THE shared ``vllm serve`` (tiny model, the CPU settings of ``tiny_settings``),
    started on first use and kept for the session: ~30 s saved per module that would start
    its own. Running when the test starts (restarted if a test before killed it); a test
    may kill and restart it (``kill``/``restart``, same port)."""
    return vllm_server_session.restart()
