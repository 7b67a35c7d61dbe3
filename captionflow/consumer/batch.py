"""Micro-batching in front of the engine: up to ``max_batch_size`` requests or
``max_wait_ms``, whichever comes first, with a bound on requests inside the engine.

vLLM batches continuously on its own; handing it requests in bursts lets one scheduler step
pick up a whole batch of prefills, and the in-engine bound keeps decoded frames from piling
up in the engine's queue when it falls behind (they wait here, where backpressure sees them).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

from captionflow.errors import EngineDeadError
from captionflow.serving.base import CaptionRequest, CaptionResult

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Item:
    request: CaptionRequest
    future: asyncio.Future[CaptionResult]
    enqueued_at: float


class MicroBatcher:
    def __init__(self, run: Callable[[CaptionRequest], Awaitable[CaptionResult]], *,
                 max_batch_size: int, max_wait_ms: int, max_in_engine: int,
                 on_batch: Callable[[int], None] | None = None,
                 on_queue_wait: Callable[[float], None] | None = None) -> None:
        self._run = run
        self._max_batch = max_batch_size
        self._max_wait_s = max_wait_ms / 1000
        self._slots = asyncio.Semaphore(max_in_engine)
        self._on_batch = on_batch
        self._on_queue_wait = on_queue_wait
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._failed: BaseException | None = None
        self.queued = 0  # submitted and not yet sent to the engine

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="captionflow-batcher")
        self._task.add_done_callback(self._on_loop_done)

    async def submit(self, request: CaptionRequest) -> CaptionResult:
        if self._failed is not None:
            raise EngineDeadError(f"batcher stopped: {self._failed}")
        loop = asyncio.get_running_loop()
        item = _Item(request, loop.create_future(), loop.time())
        self.queued += 1
        await self._queue.put(item)
        return await item.future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self._max_wait_s
            while len(batch) < self._max_batch:
                left = deadline - loop.time()
                try:
                    batch.append(self._queue.get_nowait() if left <= 0 else
                                 await asyncio.wait_for(self._queue.get(), left))
                except (asyncio.QueueEmpty, TimeoutError):
                    break
            live = [item for item in batch if not item.future.done()]
            self.queued -= len(batch) - len(live)
            if self._on_batch is not None and live:
                self._on_batch(len(live))
            for item in live:
                await self._slots.acquire()
                self.queued -= 1
                if self._on_queue_wait is not None:
                    self._on_queue_wait(loop.time() - item.enqueued_at)
                task = asyncio.create_task(self._one(item))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
                # A waiter that gives up (revoke, shutdown, a failed sibling window) aborts
                # its request, so it stops holding an engine slot.
                item.future.add_done_callback(partial(_cancel_if_cancelled, task))

    async def _one(self, item: _Item) -> None:
        try:
            result = await self._run(item.request)
        except asyncio.CancelledError:
            if not item.future.done():
                item.future.cancel()
            raise
        except BaseException as e:  # handed to the waiter, who decides
            if not item.future.done():
                item.future.set_exception(e)
        else:
            if not item.future.done():
                item.future.set_result(result)
        finally:
            self._slots.release()

    def _on_loop_done(self, task: asyncio.Task[None]) -> None:
        # A dead batcher must fail every waiter instead of leaving them hanging.
        error = None if task.cancelled() else task.exception()
        self._failed = error or RuntimeError("batcher closed")
        if error is not None:
            log.error("micro-batcher died: %r", error)
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(EngineDeadError(f"batcher stopped: {self._failed}"))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)


def _cancel_if_cancelled(task: asyncio.Task[None], future: asyncio.Future[CaptionResult]) -> None:
    if future.cancelled() and not task.done():
        task.cancel()
