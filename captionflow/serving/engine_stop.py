"""Stopping an in-process vLLM engine at once and cleanly: no process, shared memory or
traceback left behind."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

log = logging.getLogger(__name__)


def stop_engine(engine: Any) -> None:
    """Stop the engine's processes at once, leaving nothing behind.

    Every caller has its answer (or its EngineDeadError) by now, so nothing the engine
    processes still hold is worth waiting for. vLLM's graceful path takes seconds: the
    engine core waits for its CPU worker to tear its interpreter down, then tears down its
    own. ``shutdown(timeout=0)`` is vLLM's own immediate stop (SIGTERM, then SIGKILL for
    the engine core and everything it started); afterwards this waits for those processes
    to be gone and removes the shared memory and semaphores that only they mapped. A named
    semaphore that no process holds open any more cannot be told apart from other
    programs' and is left to multiprocessing's resource tracker, which removes it when
    this process exits.

    The engine's process list and ``shutdown(timeout=0)`` are vLLM internals (0.32.0),
    pinned by tests/test_engine_stop.py."""
    processes, files = _engine_processes(engine)
    engine.shutdown(timeout=0)
    _wait_gone(processes, timeout_s=_STOP_WAIT_S)
    _unlink_shm_files(files)


async def stop_output_handler(engine: Any) -> None:
    """Cancel the task in which vLLM's AsyncLLM reads the engine core's outputs.

    Left running while the engine core is killed under it, that task sees the socket
    close, logs ``AsyncLLM output_handler failed ... EngineDeadError`` with a traceback at
    ERROR level, and fails requests that no longer exist: every caller has its answer by
    now, so a clean run would end with what reads as a crash. ``output_handler`` is an
    attribute of vLLM 0.32's AsyncLLM (tests/test_engine_stop.py pins it)."""
    handler = getattr(engine, "output_handler", None)
    if isinstance(handler, asyncio.Task) and not handler.done():
        handler.cancel()
        await asyncio.wait([handler])


# How long a SIGKILLed engine process may take to be gone before close() stops waiting.
_STOP_WAIT_S = 5.0


def _engine_processes(engine: Any) -> tuple[list[Any], set[str]]:
    """The engine core process(es) and their descendants, and the multiprocessing shared
    memory and semaphores (files under /dev/shm) that they map and this process does not."""
    import psutil

    manager = getattr(getattr(getattr(engine, "engine_core", None), "resources", None),
                      "engine_manager", None)
    processes: list[psutil.Process] = []
    for proc in getattr(manager, "processes", None) or ():
        with contextlib.suppress(psutil.Error, TypeError, ValueError):
            root = psutil.Process(proc.pid)
            processes += [root, *root.children(recursive=True)]
    files: set[str] = set()
    for proc in processes:
        files |= _mapped_shm_files(proc.pid)
    return processes, files - _mapped_shm_files(os.getpid())


# /dev/shm file prefixes of multiprocessing's SharedMemory and named semaphores: what the
# file name adds to the name its resource tracker knows ("/" + the rest), and the kind.
_SHM_KINDS = {"psm_": ("", "shared_memory"), "sem.mp-": ("sem.", "semaphore")}


def _mapped_shm_files(pid: int) -> set[str]:
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
            paths = {line.split("/dev/shm/", 1)[1].strip().removesuffix(" (deleted)")
                     for line in maps if "/dev/shm/" in line}
    except OSError:
        return set()
    return {p for p in paths if p.startswith(tuple(_SHM_KINDS))}


def _wait_gone(processes: list[Any], *, timeout_s: float) -> None:
    """Until every process has exited (a zombie counts: it holds no memory) or the timeout."""
    import psutil

    deadline = time.monotonic() + timeout_s
    for proc in processes:
        while time.monotonic() < deadline:
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.Error:
                break
            time.sleep(0.01)
        else:
            log.warning("vLLM engine process %d still running %.0f s after it was killed",
                        proc.pid, timeout_s)
            return


def _unlink_shm_files(files: set[str]) -> None:
    """Remove what the killed processes' teardown would have removed, and tell
    multiprocessing's resource tracker (the engine processes share this process's) that
    they are gone: registered then unregistered, so it neither warns nor unlinks them again
    at exit, whether or not the engine had registered them."""
    from multiprocessing import resource_tracker

    for file in sorted(files):
        added, kind = next(k for p, k in _SHM_KINDS.items() if file.startswith(p))
        name = "/" + file.removeprefix(added)
        try:
            os.unlink(f"/dev/shm/{file}")
        except FileNotFoundError:
            pass  # unlinked while still open (a semaphore), still known to the tracker
        except OSError as e:
            log.warning("could not remove vLLM's /dev/shm/%s: %s", file, e)
            continue
        resource_tracker.register(name, kind)
        resource_tracker.unregister(name, kind)
