"""Caption status, the quality gate, several prompts, structured captions and window
summaries on the real vLLM CPU engine (the session's shared tiny-model engine), through the
worker's own record pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from aiokafka.structs import ConsumerRecord

from captionflow.captioning import Attempts, caption_event
from captionflow.config import Settings
from captionflow.consumer.pipeline import Output, RecordPipeline
from captionflow.metrics import Metrics
from captionflow.schemas.codec import decode_video_event
from captionflow.schemas.events import CaptionEvent, DeadLetterEvent
from captionflow.serving.base import CaptionBackend
from captionflow.video.source import FrameSource
from tests.support.worker_fixtures import make_video

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]

SCHEMA = {
    "type": "object",
    "properties": {
        "subject": {"type": "string", "maxLength": 24},
        "people": {"type": "integer", "minimum": 0, "maximum": 9},
        "moving": {"type": "boolean"},
        "setting": {"enum": ["indoor", "outdoor", "unknown"]},
    },
    "required": ["subject", "people", "moving", "setting"],
    "additionalProperties": False,
}


def settings_for(tiny_settings: Any, root: Path, *, max_tokens: int | None = None,
                 **worker: Any) -> Settings:
    """``max_tokens`` raises serving.max_tokens, the ceiling of every event's request."""
    serving = tiny_settings.model_dump()
    if max_tokens is not None:
        serving["max_tokens"] = max_tokens
    return Settings(
        serving=serving,
        video={"allowed_roots": (root,), "fps": 2.0, "max_frames": 4, "min_frames": 2,
               "min_pixels": 28 * 28 * 4, "max_pixels": 112 * 84},
        worker={"retry_backoff_ms": 0, **worker})


def record(event: dict[str, Any], offset: int = 0) -> ConsumerRecord[bytes, bytes]:
    value = orjson.dumps(event)
    return ConsumerRecord(topic="videos", partition=0, offset=offset, timestamp=0,
                          timestamp_type=0, key=event["id"].encode(), value=value,
                          checksum=None, serialized_key_size=len(event["id"]),
                          serialized_value_size=len(value), headers=())


async def run_events(settings: Settings, backend: CaptionBackend,
                     events: list[dict[str, Any]]) -> tuple[list[Output], Metrics]:
    metrics = Metrics.fresh()
    async with FrameSource(settings.video) as frames:
        pipeline = RecordPipeline(settings, clips=frames.open, caption=backend.caption,
                                  model_name="tiny", metrics=metrics, worker_id="test")
        import asyncio
        outputs = await asyncio.gather(*(pipeline.process(record(e, i))
                                         for i, e in enumerate(events)))
    return list(outputs), metrics


def caption_of(output: Output) -> CaptionEvent:
    assert output.error_code is None, output.value[:400]
    return CaptionEvent.model_validate_json(output.value)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_video(tmp_path_factory.mktemp("quality") / "v.mp4", seed=3)


async def test_max_tokens_8_is_truncated_and_the_gate_retries_show_in_event_and_metrics(
        vllm_backend: CaptionBackend, tiny_settings: Any, video: Path) -> None:
    off = settings_for(tiny_settings, video.parent, quality_gate_retries=0)
    on = settings_for(tiny_settings, video.parent, quality_gate_retries=2)
    event = {"id": "t1", "video": str(video), "options": {"sampling": {"max_tokens": 8}}}
    [out], m_off = await run_events(off, vllm_backend, [event])
    plain = caption_of(out)
    assert plain.status == "truncated" and plain.finish_reason == "length"
    assert plain.generations == 1 and plain.usage.completion_tokens == 8
    assert sample(m_off, "captionflow_captions_total", status="truncated") == 1
    assert sample(m_off, "captionflow_caption_regenerations_total", status="truncated") == 0

    [out], m_on = await run_events(on, vllm_backend, [event])
    gated = caption_of(out)
    # Every retry is cut at 8 tokens too: three requests, the first kept (best, earliest).
    assert gated.generations == 3 and gated.status == "truncated"
    assert gated.caption == plain.caption
    assert gated.usage.completion_tokens == 24
    assert sample(m_on, "captionflow_caption_regenerations_total", status="truncated") == 2
    assert sample(m_on, "captionflow_captions_total", status="truncated") == 1


async def test_three_prompts_three_captions_from_one_decode(
        vllm_backend: CaptionBackend, tiny_settings: Any, video: Path) -> None:
    settings = settings_for(tiny_settings, video.parent, quality_gate_retries=0)
    prompts = {"short": "One sentence.", "detailed": "Describe every detail.",
               "objects": "List the objects."}
    [single], m_single = await run_events(settings, vllm_backend,
                                          [{"id": "s", "video": str(video)}])
    [multi], m_multi = await run_events(
        settings, vllm_backend, [{"id": "m", "video": str(video),
                                  "options": {"prompts": prompts}}])
    one, many = caption_of(single), caption_of(multi)
    assert many.captions is not None and list(many.captions) == list(prompts)
    assert many.caption == many.captions["short"]
    assert many.captions_status == {name: "ok" for name in prompts} or all(
        s in ("ok", "truncated", "repetitive") for s in many.captions_status.values())
    assert many.generations == 3
    # One decode: the frames are counted once, as for a single prompt.
    assert many.video_info.frames_sampled == one.video_info.frames_sampled
    assert sample(m_multi, "captionflow_frames_decoded_total") == \
        sample(m_single, "captionflow_frames_decoded_total")
    assert sample(m_multi, "captionflow_captions_total", status="ok") + \
        sample(m_multi, "captionflow_captions_total", status="truncated") + \
        sample(m_multi, "captionflow_captions_total", status="repetitive") == 3
    # The conversation records the first prompt, the one `caption` answers.
    assert many.conversation[0].value == "One sentence."


async def test_twenty_structured_captions_validate(
        vllm_backend: CaptionBackend, tiny_settings: Any, video: Path) -> None:
    settings = settings_for(tiny_settings, video.parent, max_tokens=200,
                            quality_gate_retries=0)
    # Only the tokenizer's EOS, which the grammar allows where the JSON is complete, may end
    # a structured caption: the generation config's other stop id is banned.
    tokenizer = vllm_backend.engine.get_tokenizer()
    params = vllm_backend.sampling_params({}, SCHEMA)
    assert params.logit_bias == {tokenizer.convert_tokens_to_ids("<|endoftext|>"): -100.0}
    assert vllm_backend.sampling_params({}).logit_bias is None
    events = [{"id": f"j{i}", "video": str(video),
               "options": {"json_schema": SCHEMA,
                           "sampling": {"max_tokens": 200, "temperature": 1.0, "seed": i}}}
              for i in range(20)]
    outputs, metrics = await run_events(settings, vllm_backend, events)
    captions = [caption_of(o) for o in outputs]
    for c in captions:
        jsonschema.validate(c.caption_json, SCHEMA)
        assert json.loads(c.caption) == c.caption_json
        assert c.status == "ok", c.caption
        # Ended where the grammar ended it, without running on.
        assert c.finish_reason == "stop" and c.generations == 1
    assert sample(metrics, "captionflow_captions_total", status="ok") == 20
    assert len({c.caption for c in captions}) > 1  # sampled, not one fixed answer


async def test_invalid_schema_and_unknown_schema_name_are_invalid_request_dead_letters(
        vllm_backend: CaptionBackend, tiny_settings: Any, video: Path) -> None:
    settings = settings_for(tiny_settings, video.parent, quality_gate_retries=0)
    outputs, metrics = await run_events(settings, vllm_backend, [
        {"id": "bad", "video": str(video),
         "options": {"json_schema": {"type": "object", "properties": {"a": {"type": 7}}}}},
        # Valid JSON Schema that the engine's grammar backend cannot compile.
        {"id": "dangling", "video": str(video), "options": {"json_schema": {
            "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}},
        {"id": "unknown", "video": str(video), "options": {"json_schema_name": "nope"}},
        {"id": "empty", "video": str(video), "options": {"prompts": {}}},
    ])
    codes = [o.error_code for o in outputs]
    assert codes == ["invalid_request"] * 3 + ["schema_invalid"], codes
    for o in outputs:
        DeadLetterEvent.model_validate_json(o.value)
    assert sample(metrics, "captionflow_events_dead_lettered_total",
                  code="invalid_request") == 3
    # Not the engine's fault: nothing was retried.
    assert sample(metrics, "captionflow_events_retried_total", code="engine_failed") == 0


async def test_sixty_seconds_in_ten_second_windows_with_a_summary(
        vllm_backend: CaptionBackend, tiny_settings: Any, tmp_path: Path) -> None:
    clip = make_video(tmp_path / "long.mp4", seed=5, frames=60, fps=1)
    settings = Settings(
        serving=tiny_settings.model_dump(),
        video={"allowed_roots": (tmp_path,), "fps": 0.5, "max_frames": 4, "min_frames": 2,
               "min_pixels": 28 * 28 * 4, "max_pixels": 112 * 84, "window_s": 10.0},
        worker={"quality_gate_retries": 0})
    event = decode_video_event(orjson.dumps(
        {"id": "long", "video": str(clip), "options": {"summarize": True}}),
        max_bytes=1 << 20)
    async with FrameSource(settings.video) as frames:
        result = await caption_event(event, clips=frames.open, caption=vllm_backend.caption,
                                     settings=settings, attempts=Attempts(settings.worker))
    windows = result.window_captions()
    assert windows is not None
    assert [(w.start_s, w.end_s) for w in windows] == [
        (10.0 * i, 10.0 * (i + 1)) for i in range(6)]
    assert result.summarized and len(result.results) == 7
    [summary] = result.captions.values()
    [request] = summary.results
    # The summary is one text-only request: no video placeholder in its prompt.
    tokenizer = vllm_backend.engine.get_tokenizer()
    video_pad = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert video_pad not in request.prompt_token_ids
    assert all(video_pad in r.prompt_token_ids for w in result.windows
               for c in w.values() for r in c.results)
    prompt_text = tokenizer.decode(request.prompt_token_ids)
    for w in windows:
        assert f"[{w.start_s:.1f}s-{w.end_s:.1f}s]" in prompt_text
    assert result.text == summary.text and result.text != windows[0].caption
    # What the caption event carries: the summary in `caption`, each window with its status.
    fields = result.quality_fields()
    assert fields["summarized"] is True and fields["generations"] == 7
    assert fields["status"] == summary.status
    assert all(w.status in ("ok", "truncated", "repetitive", "empty") and w.generations == 1
               for w in windows)


async def test_batch_rows_get_the_same_fields(vllm_backend: CaptionBackend, tiny_settings: Any,
                                              video: Path, tmp_path: Path) -> None:
    from captionflow.batch.job import run_file

    settings = settings_for(tiny_settings, video.parent, max_tokens=200,
                            quality_gate_retries=0)
    rows = [{"video": [str(video)], "options": {"prompts": {"a": "One sentence.",
                                                            "b": "Every detail."},
                                                "sampling": {"max_tokens": 12}}},
            {"video": [str(video)], "options": {"json_schema": SCHEMA,
                                                "sampling": {"max_tokens": 200}}},
            {"video": [str(video)], "options": {"sampling": {"max_tokens": 8}}}]
    src, out = tmp_path / "rows.json", tmp_path / "out.json"
    src.write_bytes(orjson.dumps(rows))
    report = await run_file(str(src), out, cache_type="json", settings=settings,
                            backend=vllm_backend)
    assert report.captioned == 3
    multi, structured, short = orjson.loads(out.read_bytes())
    assert list(multi["captions"]) == ["a", "b"] and multi["caption"] == multi["captions"]["a"]
    assert set(multi["captions_status"]) == {"a", "b"}
    assert multi["caption_generations"] == 2
    jsonschema.validate(structured["caption_json"], SCHEMA)
    assert structured["caption_status"] == "ok"
    assert short["caption_status"] == "truncated" and "captions" not in short
