"""Closing the vLLM backend stops its engine processes at once and leaves nothing behind: no
engine core or CPU worker running, none of the shared memory only they mapped."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import psutil
import pytest

from captionflow.config import ServingSettings
from captionflow.errors import EngineDeadError
from captionflow.serving import CaptionRequest
from captionflow.serving.vllm_engine import VllmBackend, _engine_processes
from tests.support.model_fixtures import synthetic_clip

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session"),
              pytest.mark.timeout(600),
              # vLLM's engine client leaves a zmq context for the garbage collector.
              pytest.mark.filterwarnings("ignore:Unclosed context:ResourceWarning"),
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]


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


async def test_close_stops_the_engine_tree_and_removes_its_shared_memory(
        tiny_settings: ServingSettings) -> None:
    backend = VllmBackend(tiny_settings)  # its own engine: the session's stays up
    await backend.start()
    try:
        result = await backend.caption(CaptionRequest("stop-1", synthetic_clip(0, frames=4,
                                                                               fps=1.0), ""))
        assert result.completion_tokens > 0
        processes, shm_files = _engine_processes(backend.engine)
        names = {p.name() for p in processes}
        # The CPU engine: the engine core and the worker process it starts.
        assert len(processes) >= 2, names
        assert any(f.startswith("psm_") for f in shm_files), shm_files
        assert all(Path("/dev/shm", f).exists() for f in shm_files if f.startswith("psm_"))
        # vLLM 0.32's AsyncLLM reads the engine core's outputs in this task; close()
        # cancels it before the engine core is killed under it.
        assert isinstance(backend.engine.output_handler, asyncio.Task)
    finally:
        errors = _Records()
        vllm_log = logging.getLogger("vllm")
        vllm_log.addHandler(errors)
        try:
            await backend.close()
        finally:
            vllm_log.removeHandler(errors)

    # A clean close logs no error: not vLLM's "output_handler failed ... EngineDeadError".
    assert not [r.getMessage() for r in errors.records if r.levelno >= logging.ERROR]

    assert not [p.pid for p in processes if running(p)]
    assert not [f for f in shm_files if Path("/dev/shm", f).exists()]
    # This process's own children: the decoders and engines of other tests aside, none
    # of the stopped engine's processes is left for anyone to reap but init.
    own = {c.pid for c in psutil.Process(os.getpid()).children(recursive=True)}
    assert not own & {p.pid for p in processes if running(p)}
    with pytest.raises(EngineDeadError):
        await backend.caption(CaptionRequest("stop-2", synthetic_clip(1, frames=4, fps=1.0),
                                             ""))
