"""Two asyncio helpers the long-running services share: blocking calls in daemon threads,
and the two-step SIGTERM/SIGINT handling of a service that drains before it exits."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)


async def in_daemon_thread(fn: Callable[..., T], *args: Any, name: str,
                           release: Callable[[Any], None] | None = None) -> T:
    """``fn(*args)`` in a daemon thread. Unlike an executor's threads, interpreter exit does
    not join it, so a call stuck past its caller's timeout never holds shutdown.

    ``release(result)`` is called on a result nobody will receive any more (the awaiting
    task was cancelled, or the loop is gone), so that what it holds (a temporary file) is
    freed."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def drop(ok: bool, value: Any) -> None:
        if ok and release is not None:
            release(value)

    def deliver(ok: bool, value: Any) -> None:
        if future.done():
            drop(ok, value)
        elif ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def body() -> None:
        try:
            result: tuple[bool, Any] = (True, fn(*args))
        except BaseException as e:  # handed to the awaiting task
            result = (False, e)
        try:
            loop.call_soon_threadsafe(deliver, *result)
        except RuntimeError:  # the loop is gone: nobody waits any more
            drop(*result)

    threading.Thread(target=body, name=name, daemon=True).start()
    return await future


def install_stop_signals(stop: Callable[[], None], stopping: Callable[[], bool]) -> None:
    """SIGTERM/SIGINT call ``stop()`` (a graceful drain); a second one, while ``stopping()``,
    exits at once: the operator has decided not to wait."""
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if stopping():
            log.warning("second %s: exiting now", sig.name)
            os._exit(1)
        log.info("%s received", sig.name)
        stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
