"""Limits a producer cannot lift (captionflow.event_limits), on the real vLLM CPU engine (the
session's shared tiny-model engine) with real encoded videos: per-request max_tokens is
clamped to serving.max_tokens, and the prompt count, the event's token total and the JSON
Schema size are refused past their ceilings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from captionflow.captioning import Attempts, caption_event
from captionflow.config import Settings
from captionflow.errors import InvalidRequestError, VideoTooLongError
from captionflow.event_limits import TokenBudget
from captionflow.schemas.codec import decode_video_event
from captionflow.schemas.events import DeadLetterEvent
from captionflow.serving.base import CaptionBackend
from captionflow.video.source import FrameSource
from tests.support.worker_fixtures import make_video
from tests.test_captions_engine import run_events

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]

GREEDY_4000 = {"max_tokens": 4000, "temperature": 0.0}


def limited(tiny_settings: Any, root: Path, *, serving: dict[str, Any] | None = None,
            **worker: Any) -> Settings:
    return Settings(
        serving={**tiny_settings.model_dump(), **(serving or {})},
        video={"allowed_roots": (root,), "fps": 2.0, "max_frames": 4, "min_frames": 2,
               "min_pixels": 28 * 28 * 4, "max_pixels": 112 * 84},
        worker={"retry_backoff_ms": 0, **worker})


async def caption(settings: Settings, backend: CaptionBackend, event: dict[str, Any]):
    ev = decode_video_event(orjson.dumps(event), max_bytes=1 << 20)
    async with FrameSource(settings.video) as frames:
        return await caption_event(ev, clips=frames.open, caption=backend.caption,
                                   settings=settings, attempts=Attempts(settings.worker))


def per_request_tokens(result: Any) -> list[int]:
    return [r.completion_tokens for c in result.generated() for r in c.results]


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_video(tmp_path_factory.mktemp("limits") / "v.mp4", seed=11)


async def test_max_tokens_4000_gets_at_most_serving_max_tokens_per_request(
        vllm_backend: CaptionBackend, tiny_settings: Any, video: Path) -> None:
    event = {"id": "greedy", "video": str(video), "options": {"sampling": GREEDY_4000}}
    # The same event under a higher ceiling runs past 16 tokens: the clamp is what stops it.
    roomy = await caption(limited(tiny_settings, video.parent, serving={"max_tokens": 48},
                                  quality_gate_retries=0), vllm_backend, event)
    assert per_request_tokens(roomy)[0] > 16, roomy.first.text
    # Each quality-gate retry is clamped too.
    tight = await caption(limited(tiny_settings, video.parent, serving={"max_tokens": 16},
                                  quality_gate_retries=2), vllm_backend, event)
    tokens = per_request_tokens(tight)
    assert tokens == [16, 16, 16], tokens
    assert tight.first.finish_reason == "length" and tight.first.status == "truncated"


async def test_sixteen_prompts_each_clamped_and_the_event_total_bounded(
        vllm_backend: CaptionBackend, tiny_settings: Any, video: Path) -> None:
    prompts = {f"p{i}": f"Describe part {i}." for i in range(16)}
    event = {"id": "many", "video": str(video),
             "options": {"prompts": prompts, "sampling": GREEDY_4000}}
    # 16 first requests of 16 tokens reserve 256; the quality gate may spend only what they
    # leave unused of 272, i.e. at most one retry of 16.
    settings = limited(tiny_settings, video.parent,
                       serving={"max_tokens": 16, "max_completion_tokens_per_event": 272},
                       quality_gate_retries=2)
    result = await caption(settings, vllm_backend, event)
    tokens = per_request_tokens(result)
    assert len(result.captions) == 16 and all(t <= 16 for t in tokens), tokens
    assert sum(tokens) <= 272 and len(tokens) <= 17, tokens

    # Over the prompt count, or over the event total: refused before any request.
    few = limited(tiny_settings, video.parent,
                  serving={"max_tokens": 16, "max_prompts_per_event": 4})
    small = limited(tiny_settings, video.parent,
                    serving={"max_tokens": 16, "max_completion_tokens_per_event": 255})
    [count_out], _ = await run_events(few, vllm_backend, [event])
    [total_out], metrics = await run_events(small, vllm_backend, [event])
    for out, says in ((count_out, "serving.max_prompts_per_event allows 4"),
                      (total_out, "serving.max_completion_tokens_per_event=255")):
        dead = DeadLetterEvent.model_validate_json(out.value)
        assert dead.error.code == "invalid_request" and says in dead.error.message
    assert metrics.registry.get_sample_value("captionflow_tokens_total",
                                             {"kind": "completion"}) in (None, 0.0)


async def test_a_json_schema_over_the_size_limit_is_refused(
        vllm_backend: CaptionBackend, tiny_settings: Any, video: Path) -> None:
    schema = {"type": "object", "properties": {f"field_{i}": {"type": "string"}
                                               for i in range(200)}}
    settings = limited(tiny_settings, video.parent, serving={"max_json_schema_bytes": 1024})
    [out], _ = await run_events(settings, vllm_backend, [
        {"id": "big-schema", "video": str(video), "options": {"json_schema": schema}}])
    dead = DeadLetterEvent.model_validate_json(out.value)
    assert dead.error.code == "invalid_request"
    assert "serving.max_json_schema_bytes allows 1024" in dead.error.message


async def test_token_budget_spends_retries_only_from_the_unused_share() -> None:
    budget = TokenBudget(limit=40, per_request=10, first_requests=3)
    assert budget.spare == 10
    assert budget.take_retry() and not budget.take_retry()
    budget.settle(4)  # a first request that stopped at 4 tokens frees 6
    assert not budget.take_retry()
    budget.settle(6)
    assert budget.take_retry()
    with pytest.raises(InvalidRequestError, match="max_completion_tokens_per_event=29"):
        TokenBudget(limit=29, per_request=10, first_requests=3)


async def test_windows_rescue_a_video_over_max_duration_s(
        vllm_backend: CaptionBackend, tiny_settings: Any, tmp_path: Path) -> None:
    clip = make_video(tmp_path / "twelve.mp4", seed=12, frames=12, fps=1)
    event = {"id": "long", "video": str(clip)}
    video = {"allowed_roots": (tmp_path,), "fps": 1.0, "max_frames": 4, "min_frames": 2,
             "min_pixels": 28 * 28 * 4, "max_pixels": 112 * 84, "max_duration_s": 5.0}
    plain = Settings(serving=tiny_settings.model_dump(), video=video,
                     worker={"quality_gate_retries": 0})
    with pytest.raises(VideoTooLongError, match=r"over video.max_duration_s=5 s.*video.window_s"):
        await caption(plain, vllm_backend, event)
    windowed = Settings(serving=tiny_settings.model_dump(), video={**video, "window_s": 4.0},
                        worker={"quality_gate_retries": 0})
    result = await caption(windowed, vllm_backend, event)
    assert [(w.start_s, w.end_s) for w in result.window_captions()] == [
        (0.0, 4.0), (4.0, 8.0), (8.0, 12.0)]
    # Past what max_windows windows cover, the video is still refused, naming that bound.
    few = Settings(serving=tiny_settings.model_dump(),
                   video={**video, "window_s": 4.0, "max_windows": 2},
                   worker={"quality_gate_retries": 0})
    with pytest.raises(VideoTooLongError, match=r"video.max_windows x video.window_s=8 s"):
        await caption(few, vllm_backend, event)
