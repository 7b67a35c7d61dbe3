"""Decoder child processes: a crash, a memory blow-up or a hang in FFmpeg costs one event.

``DecodePool`` keeps at most ``video.decode_workers`` child processes and gives each one
task at a time (a probe, or the decode of one clip's frames). Each child is a fresh
interpreter (``python -m captionflow.video.decoder_process``, started with ``subprocess``), talking
over a socketpair: the worker process holds a vLLM engine, its threads and CUDA state,
which ``fork`` would copy in a half-locked state; multiprocessing's ``spawn`` and
``forkserver`` re-import the parent's ``__main__`` in every child (a script without a
main guard would start itself again). A child costs one interpreter start (~0.5 s, paid
once per child, not per task). Each child sets
``RLIMIT_AS`` to ``video.decode_memory_limit_bytes`` before it takes work, so a video that
needs more memory fails with ``decode_out_of_memory`` instead of waking the OOM killer.

Frames come back through shared memory: the child decodes straight into a ``memfd``
(anonymous shared memory, not limited by the size of ``/dev/shm``) and passes its file
descriptor over the pipe (``SCM_RIGHTS``); the parent maps it and wraps it in a numpy
array without copying. The memory is freed when that array is.

Signals are the worker's to handle: each child runs in its own process group (a signal to
the worker's group does not reach it) and ignores SIGINT and SIGTERM besides; it exits when
the worker closes its end of the socket, or dies.
A child that dies (signal, ``os._exit``: its end of the socket closes), runs past
``video.decode_timeout_s``, or whose
task is cancelled (a sibling window failed, shutdown) is killed and dropped; its task fails
with ``decode_crashed`` / ``decode_timeout`` / the cancellation, and the next task starts a
fresh child. ``close`` kills every child at once: it never waits on a stuck decode.

With a GPU ``video.decode_device`` each child opens the device once when it starts and
holds it (so every decode attaches to the same CUDA context), and says in its "ready"
whether it could. :meth:`DecodePool.start_one`, called before the first record, raises
``decode_device_unavailable`` (fatal) when the first child could not: the host has no
usable device. A child started later that cannot (the GPU's memory is full) still serves:
its decodes fall back to the CPU, each one counted.

``concurrent.futures.ProcessPoolExecutor`` does not fit: one dead child marks the whole
executor broken and fails every pending task, and it cannot kill a running task.
"""

from __future__ import annotations

import asyncio
import logging
import math
import mmap
import os
import signal
import socket
import subprocess
import sys
import time
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from captionflow import errors
from captionflow.errors import (
    CaptionflowError,
    DecodeCrashedError,
    DecodeDeviceUnavailableError,
    DecodeOutOfMemoryError,
    DecodeTimeoutError,
    ErrorCode,
    EventError,
    InternalError,
)
from captionflow.video.decode import DecodeStats

log = logging.getLogger(__name__)
# An interpreter start and the PyAV/numpy imports; minutes only on a machine in trouble.
_START_TIMEOUT_S = 120.0


class _Child:
    def __init__(self, process: subprocess.Popen[bytes], conn: Connection) -> None:
        self.process = process
        self.conn = conn
        self.tasks = 0
        self.task = ""  # what it is doing now
        # Set once a task's answer came back whole: only then may the child take more work.
        self.reusable = False
        self._reaped = False
        self.device_error: str | None = None  # why it could not open the GPU decode device

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()

    def reap(self) -> None:
        """Close the pipe and collect the process (after kill, or once it exited)."""
        if self._reaped:
            return
        self._reaped = True
        self.conn.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.warning("decoder process %d did not exit 5 s after SIGKILL", self.pid)


class DecodePool:
    """At most ``workers`` decoder processes; ``await probe(...)`` / ``await decode(...)``."""

    def __init__(self, *, workers: int, memory_limit_bytes: int, timeout_s: float,
                 device: str = "cpu") -> None:
        self._limit = memory_limit_bytes
        self._device = device
        self._timeout_s = timeout_s
        self._slots = asyncio.Semaphore(workers)
        self._idle: list[_Child] = []
        self._busy: set[_Child] = set()
        self._closed = False
        self.started = 0  # children started, replacements included
        # Peak RSS (bytes) each child reported with its last answer, by pid.
        self.peak_rss_bytes: dict[int, int] = {}

    def busy_pids(self, task: str | None = None) -> list[int]:
        """Pids of the children working now (on ``task``: "probe" or "decode")."""
        return [c.pid for c in self._busy if task is None or c.task == task]

    def pids(self) -> list[int]:
        return [c.pid for c in (*self._idle, *self._busy)]

    async def start_one(self) -> None:
        """Start a child now and keep it idle: it pays the interpreter start before the
        first task and, with a GPU device, raises ``decode_device_unavailable`` here."""
        async with self._slots:
            if self._closed:
                raise InternalError("the decoder pool is closed")
            child = await self._start()
            if child.device_error is not None:
                child.kill()
                await asyncio.to_thread(child.reap)
                raise DecodeDeviceUnavailableError(child.device_error)
            self._idle.append(child)

    async def probe(self, **kwargs: Any) -> Any:
        return await self._run("probe", kwargs)

    async def decode(self, **kwargs: Any) -> tuple[np.ndarray, DecodeStats]:
        frames, stats = await self._run("decode", kwargs)
        return frames, DecodeStats(**stats)

    async def _run(self, task: str, kwargs: dict[str, Any]) -> Any:
        async with self._slots:
            if self._closed:
                raise InternalError("the decoder pool is closed")
            if self._idle:
                child = self._idle.pop()
            else:
                child = await self._start()
                if child.device_error is not None:
                    log.warning("decoder process %d decodes on the CPU: %s", child.pid,
                                child.device_error)
            self._busy.add(child)
            child.reusable = False
            try:
                return await self._call(child, task, kwargs)
            finally:
                self._busy.discard(child)
                if child.reusable and not self._closed:
                    self._idle.append(child)
                else:
                    child.kill()
                    await asyncio.to_thread(child.reap)

    async def _start(self) -> _Child:
        ours, theirs = socket.socketpair()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "captionflow.video.decoder_process", str(theirs.fileno()),
                 str(self._limit), self._device],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                # Its own process group from the first instruction: a signal sent to the
                # worker's group cannot kill a child still starting, before child_main
                # ignores SIGTERM and SIGINT.
                process_group=0)
        finally:
            theirs.close()
        self.started += 1
        child = _Child(process, Connection(ours.detach()))
        try:
            await self._readable(child, _START_TIMEOUT_S)
            hello = child.conn.recv()
            if hello[0] != "ready":
                raise EOFError
            child.device_error = hello[2]
        except (TimeoutError, EOFError, OSError) as e:
            child.kill()
            await asyncio.to_thread(child.reap)
            raise InternalError(f"a decoder process did not start ({e!r}); see its stderr "
                                "above") from e
        except BaseException:
            # Cancelled during the handshake (the run or the worker is stopping): the child
            # must not outlive it. SIGKILL makes the wait short, so it is done in place.
            child.kill()
            child.reap()
            raise
        return child

    @staticmethod
    async def _readable(child: _Child, timeout_s: float) -> None:
        """Until the child answers, or dies (its end of the socket closes), or timeout."""
        loop = asyncio.get_running_loop()
        woke = loop.create_future()

        def wake() -> None:
            if not woke.done():
                woke.set_result(None)

        loop.add_reader(child.conn.fileno(), wake)
        try:
            await asyncio.wait_for(woke, timeout_s)
        finally:
            loop.remove_reader(child.conn.fileno())
            # uvloop (Ray's workers, uvicorn) makes a watched descriptor non-blocking; the
            # Connection reads below expect a blocking one, or a message that arrives in
            # pieces reads as a dead child.
            os.set_blocking(child.conn.fileno(), True)

    async def _call(self, child: _Child, task: str, kwargs: dict[str, Any]) -> Any:
        child.tasks += 1
        child.task = task
        name = getattr(kwargs.get("path"), "name", "?")
        try:
            child.conn.send((task, kwargs))
        except OSError:
            raise self._crashed(child, name, task) from None
        started = time.monotonic()
        try:
            await self._readable(child, self._timeout_s)
            # A starved event loop can see the answer and the deadline at once; the
            # deadline holds either way (the child, not reusable, is killed below).
            late = time.monotonic() - started > self._timeout_s
        except TimeoutError:
            late = True
        if late:
            raise DecodeTimeoutError(
                f"{task} of {name} ran over video.decode_timeout_s={self._timeout_s:g}; "
                "its decoder process was killed")
        try:
            if not child.conn.poll(0):
                raise EOFError
            reply = child.conn.recv()
            if reply[0] == "frames":
                fd = reduction.recv_handle(child.conn)
        except (EOFError, OSError):
            if self._closed:
                raise asyncio.CancelledError("the decoder pool was closed (shutdown)") from None
            raise self._crashed(child, name, task) from None
        kind = reply[0]
        child.reusable = True
        if kind == "ok":
            self.peak_rss_bytes[child.pid] = reply[2]
            return reply[1]
        if kind == "frames":
            _, shape, stats, rss = reply
            self.peak_rss_bytes[child.pid] = rss
            return _map_frames(fd, shape), stats
        if kind == "error":
            _, cls_name, code, message, retriable = reply
            cls = getattr(errors, cls_name, None)
            if not (isinstance(cls, type) and issubclass(cls, CaptionflowError)):
                cls = EventError
            return_error = cls(message, code=ErrorCode(code), retriable=retriable)
            # The child survived its error unless it was out of memory (its heap may be
            # fragmented past the limit): start a fresh one then.
            if isinstance(return_error, DecodeOutOfMemoryError):
                child.reusable = False
            raise return_error
        raise EventError(f"{task} of {name} failed unexpectedly in the decoder: {reply[1]}",
                         code=ErrorCode.INTERNAL)

    def _crashed(self, child: _Child, name: str, task: str) -> DecodeCrashedError:
        try:
            code = child.process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            code = None
        if code is not None and code < 0:
            how = f"killed by {signal.Signals(-code).name}"
        else:
            how = f"exit status {code}"
        hint = ""
        if code in (-signal.SIGKILL, -signal.SIGABRT, -signal.SIGSEGV):
            hint = (" (a crash in the decoder, or killed for memory: see "
                    "video.decode_memory_limit_bytes)")
        log.warning("decoder process %d died during %s of %s: %s", child.pid, task, name, how)
        return DecodeCrashedError(
            f"the decoder process died during {task} of {name}: {how}{hint}; the video was "
            "not captioned and the decoder was replaced")

    async def close(self) -> None:
        """Kill every child now, busy or idle. A task running in one ends with
        ``CancelledError``: its work was abandoned, not failed, so no event is blamed."""
        if self._closed:
            return
        self._closed = True
        for child in self._busy:
            child.kill()  # its task sees the socket close, then reaps it
        idle, self._idle = self._idle, []
        for child in idle:
            child.kill()
            await asyncio.to_thread(child.reap)


def _map_frames(fd: int, shape: tuple[int, ...]) -> np.ndarray:
    try:
        mm = mmap.mmap(fd, math.prod(shape))
    finally:
        os.close(fd)
    # The array keeps the mapping alive; it is unmapped when the array is freed.
    return np.ndarray(shape, np.uint8, buffer=mm)
