"""Shutting the engine down mid-flight fails every waiter with EngineDeadError, no hang.
Needs its own engine (the shared one must survive)."""

from __future__ import annotations

import asyncio
import time

import pytest

from captionflow.errors import EngineDeadError
from captionflow.serving import CaptionRequest, VllmBackend
from tests.support.model_fixtures import synthetic_clip

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300),
              pytest.mark.filterwarnings("ignore:Unclosed context:ResourceWarning"),
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]


async def test_close_mid_flight_fails_every_waiter(tiny_settings):
    backend = VllmBackend(tiny_settings.model_copy(update={"max_tokens": 400}))
    await backend.start()
    waiters = [asyncio.create_task(backend.caption(
        CaptionRequest(f"d{i}", synthetic_clip(400 + i), "", {"max_tokens": 400})))
        for i in range(12)]
    await asyncio.sleep(0.5)
    started = time.monotonic()
    await backend.close()
    results = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 30)
    assert time.monotonic() - started < 30
    failed = [r for r in results if isinstance(r, EngineDeadError)]
    assert failed and len(failed) + sum(not isinstance(r, BaseException) for r in results) == 12
    assert all("shut down" in str(r) for r in failed)
    with pytest.raises(EngineDeadError):
        await backend.caption(CaptionRequest("after", synthetic_clip(1), ""))
    assert not await backend.healthy()
