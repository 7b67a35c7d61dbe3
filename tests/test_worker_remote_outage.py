"""A `vllm serve` restart is an outage, not the events' fault: the worker (openai backend)
pauses, turns not ready and captions everything once the server is back. Real server
(the session's ``vllm_server``: SIGKILLed, kept down, restarted on the same port), real
broker, real videos."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from captionflow.producer import Publisher
from captionflow.schemas import decode_caption_event
from tests.support.kafka_helpers import read_topic, wait_all_committed, wait_until
from tests.support.vllm_server import VllmServer
from tests.support.worker_fixtures import running_worker, worker_settings

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session"),
              pytest.mark.timeout(900),
              pytest.mark.filterwarnings("ignore:Unclosed context:ResourceWarning"),
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]

# How long the test keeps the server down before it starts restarting it; the restart
# itself (~20-40 s until /health answers) adds to the outage the worker rides out.
OUTAGE_S = 15.0
N_EVENTS = 40  # enough that requests are in flight when the server dies


async def test_remote_engine_restart_writes_no_dead_letters_and_captions_everything(
        kafka, topics, group_id, tiny_settings, vllm_server: VllmServer,
        caption_videos) -> None:
    serving = tiny_settings.model_copy(update={
        "backend": "openai", "openai_base_url": vllm_server.url,
        "openai_max_retries": 1, "openai_retry_backoff_ms": 100,
        "served_model_name": None})
    settings = worker_settings(kafka, topics, group_id, serving, (caption_videos[0].parent,),
                               **{"worker.probe_backoff_max_ms": 2000,
                                  "worker.max_in_flight": 4, "worker.resume_in_flight": 1})
    from captionflow.serving.openai_client import OpenAIBackend

    backend = OpenAIBackend(serving)
    await backend.start()
    try:
        async with Publisher(kafka, topic=topics.input) as pub:
            report = await pub.publish_inputs(
                [str(caption_videos[i % len(caption_videos)]) for i in range(N_EVENTS)],
                id_from="uuid")
        ids = {ev.id for ev, _ in report.sent}
        async with running_worker(settings, backend) as (worker, task):
            await read_topic(kafka, topics.output, expected=2, timeout_s=120, settle_s=0)
            await asyncio.to_thread(vllm_server.kill)
            in_flight_at_kill = worker._tracker.in_flight()
            assert in_flight_at_kill > 0, "the server died with no request in flight"
            killed_at = time.monotonic()
            unready_seen = False
            async with httpx.AsyncClient() as client:
                while time.monotonic() - killed_at < OUTAGE_S:
                    status = (await client.get(
                        f"http://127.0.0.1:{worker.http_port}/readyz")).status_code
                    unready_seen |= status == 503
                    assert not task.done(), "the worker must ride out the outage"
                    await asyncio.sleep(1.0)
            assert unready_seen, "/readyz never said 503 while the server was down"
            assert "engine" in worker.health.reason
            during = await read_topic(kafka, topics.dead_letter, expected=0, settle_s=0.2)
            assert during == [], "an outage wrote dead letters"
            await asyncio.to_thread(vllm_server.restart)
            records = await read_topic(kafka, topics.output, expected=N_EVENTS,
                                       timeout_s=240)
            await wait_until(lambda: worker.health.ready, timeout_s=30)
            await wait_all_committed(kafka, topics.input, group_id)
            outages = worker.metrics.dependency_outages.labels("engine")._value.get()
    finally:
        await backend.close()
    assert {decode_caption_event(r.value).id for r in records} == ids
    assert await read_topic(kafka, topics.dead_letter, expected=0, settle_s=0.5) == []
    assert outages >= 1
