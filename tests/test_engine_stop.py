"""Closing the vLLM backend: mid-flight, every waiter fails with EngineDeadError (no hang);
and the engine's processes stop at once and leave nothing behind: no engine core or CPU
worker running, none of the shared memory only they mapped.

One engine of its own (the session's must survive) serves both tests: the module's
scenario captions a request, notes the engine's processes and shared memory, sends 12
long requests and closes the engine while they run; each test asserts one side of it.

Written against vLLM 0.32.0, whose internals ``serving/engine_stop.py`` uses for this
(``engine_core.resources.engine_manager.processes``, ``shutdown(timeout=0)``, the
``psm_``/``sem.mp-`` names of multiprocessing's shared memory): this test pins them."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import pytest_asyncio

from captionflow.config import ServingSettings
from captionflow.errors import EngineDeadError
from captionflow.serving import CaptionRequest
from captionflow.serving.engine_stop import _engine_processes
from captionflow.serving.vllm_engine import VllmBackend
from tests.support.model_fixtures import synthetic_clip

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session"),
              pytest.mark.timeout(600),
              # vLLM's engine client leaves a zmq context for the garbage collector.
              pytest.mark.filterwarnings("ignore:Unclosed context:ResourceWarning"),
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]

VLLM = "0.32.0"
N_WAITERS = 12


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@dataclass
class Closed:
    backend: VllmBackend
    first_tokens: int
    processes: list[Any]
    names: set[str]
    shm_files: set[str]
    # Whether every psm_ file existed while the engine ran.
    shm_existed: bool
    close_s: float
    results: list[Any]
    # What vLLM logged while the engine was closed.
    vllm_log: list[logging.LogRecord]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def closed_mid_flight(tiny_settings: ServingSettings) -> AsyncIterator[Closed]:
    backend = VllmBackend(tiny_settings.model_copy(update={"max_tokens": 400}))
    vllm_records = _Records()
    await backend.start()
    try:
        first = await backend.caption(CaptionRequest(
            "stop-1", synthetic_clip(0, frames=4, fps=1.0), "", {"max_tokens": 12}))
        processes, shm_files = _engine_processes(backend.engine)
        names = {p.name() for p in processes}
        shm_existed = all(Path("/dev/shm", f).exists() for f in shm_files
                          if f.startswith("psm_"))
        # vLLM 0.32's AsyncLLM reads the engine core's outputs in this task; close()
        # cancels it before the engine core is killed under it.
        assert isinstance(backend.engine.output_handler, asyncio.Task)
        waiters = [asyncio.create_task(backend.caption(
            CaptionRequest(f"d{i}", synthetic_clip(400 + i), "", {"max_tokens": 400})))
            for i in range(N_WAITERS)]
        await asyncio.sleep(0.5)
        started = time.monotonic()
    finally:
        vllm_log = logging.getLogger("vllm")
        vllm_log.addHandler(vllm_records)
        try:
            await backend.close()
        finally:
            vllm_log.removeHandler(vllm_records)
    results = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 30)
    yield Closed(backend, first.completion_tokens, processes, names, shm_files, shm_existed,
                 time.monotonic() - started, results, vllm_records.records)


async def test_close_mid_flight_fails_every_waiter(closed_mid_flight: Closed) -> None:
    c = closed_mid_flight
    assert c.close_s < 30
    failed = [r for r in c.results if isinstance(r, EngineDeadError)]
    assert failed and len(failed) + sum(
        not isinstance(r, BaseException) for r in c.results) == N_WAITERS
    assert all("shut down" in str(r) for r in failed)
    with pytest.raises(EngineDeadError):
        await c.backend.caption(CaptionRequest("after", synthetic_clip(1), ""))
    assert not await c.backend.healthy()
    # Closing logs no error: not vLLM's "output_handler failed ... EngineDeadError".
    assert not [r.getMessage() for r in c.vllm_log if r.levelno >= logging.ERROR]


async def test_close_stops_the_engine_tree_and_removes_its_shared_memory(
        closed_mid_flight: Closed) -> None:
    import vllm

    assert vllm.__version__ == VLLM, (
        f"vLLM {vllm.__version__} is not {VLLM}, whose engine internals stop_engine uses: "
        "check this test passes, then update VLLM")
    c = closed_mid_flight
    assert c.first_tokens > 0
    # The CPU engine: the engine core and the worker process it starts.
    assert len(c.processes) >= 2, c.names
    assert any(f.startswith("psm_") for f in c.shm_files), c.shm_files
    assert c.shm_existed
    assert not [p.pid for p in c.processes if running(p)]
    assert not [f for f in c.shm_files if Path("/dev/shm", f).exists()]
    # This process's own children: the decoders and engines of other tests aside, none
    # of the stopped engine's processes is left for anyone to reap but init.
    own = {c.pid for c in psutil.Process(os.getpid()).children(recursive=True)}
    assert not own & {p.pid for p in c.processes if running(p)}
    with pytest.raises(EngineDeadError):
        await c.backend.caption(CaptionRequest("stop-2", synthetic_clip(1, frames=4,
                                                                        fps=1.0), ""))
