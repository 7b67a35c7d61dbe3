"""The caption cache on the real vLLM CPU engine (the session's shared tiny-model engine):
what makes a miss, duplicates through a real worker, batch reruns and the DataFlow API.
Engine requests are counted where they enter the engine (``CountingBackend``)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest

from captionflow.cache import open_cache
from captionflow.captioning import Attempts, caption_event
from captionflow.caption_result import EventCaption
from captionflow.config import Settings
from captionflow.producer import Publisher
from captionflow.schemas import decode_caption_event
from captionflow.schemas.codec import decode_video_event
from captionflow.serving.base import CaptionBackend
from captionflow.video.source import FrameSource
from tests.support.counting import CountingBackend
from tests.support.kafka_helpers import read_topic, wait_all_committed
from tests.support.worker_fixtures import make_video, running_worker, worker_settings

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]
PROMPTS = {"short": "One sentence.", "long": "Every detail."}


def _settings(tiny_settings: Any, root: Path, store: Path, **cache: Any) -> Settings:
    return Settings(
        serving=tiny_settings.model_dump(),
        video={"allowed_roots": (root,), "fps": 2.0, "max_frames": 4, "min_frames": 2,
               "min_pixels": 28 * 28 * 4, "max_pixels": 112 * 84},
        worker={"retry_backoff_ms": 0, "quality_gate_retries": 0},
        cache={"enabled": True, "store": str(store), **cache})


async def _caption(counting: CountingBackend, settings: Settings,
                   event: dict[str, Any]) -> tuple[EventCaption, int]:
    before = len(counting.requests)
    cache = open_cache(settings, model=str(counting.model_info()["model"]))
    parsed = decode_video_event(orjson.dumps(event), max_bytes=1 << 20)
    async with FrameSource(settings.video) as frames:
        result = await caption_event(parsed, clips=frames.open, caption=counting.caption,
                                     settings=settings, attempts=Attempts(settings.worker),
                                     cache=cache)
    return result, len(counting.requests) - before


async def test_model_prompt_and_frame_policy_changes_each_make_a_miss(
        vllm_backend: CaptionBackend, tiny_settings: Any, tmp_path: Path) -> None:
    video = str(make_video(tmp_path / "v.mp4", seed=31))
    counting = CountingBackend(vllm_backend)
    base = _settings(tiny_settings, tmp_path, tmp_path / "cache")
    first, n = await _caption(counting, base, {"id": "a", "video": video})
    assert n == 1 and first.cache_info() is not None and not first.cache_info().hit
    again, n = await _caption(counting, base, {"id": "b", "video": video})
    info = again.cache_info()
    assert n == 0 and again.text == first.text and info is not None and info.hit
    assert info.key == first.cache_info().key and again.frames_decoded == 0
    assert [c.num_frames for c in again.clips] == [c.num_frames for c in first.clips]
    # Frame options past the worker's limits are clamped first: the same frames, a hit.
    _, n = await _caption(counting, base, {"id": "c", "video": video,
                                           "options": {"max_frames": 64}})
    assert n == 0
    _, n = await _caption(counting, base, {"id": "d", "video": video,
                                           "options": {"prompt": "What moves?"}})
    assert n == 1, "a prompt change must miss"
    _, n = await _caption(counting, base, {"id": "e", "video": video, "options": {"fps": 1.0}})
    assert n == 1, "a frame policy change must miss"
    other_model = _settings(tiny_settings, tmp_path, tmp_path / "cache",
                            model_revision="another-checkpoint")
    _, n = await _caption(counting, other_model, {"id": "f", "video": video})
    assert n == 1, "a model change must miss"
    bypass, n = await _caption(counting, base, {"id": "g", "video": video,
                                                "options": {"cache": False}})
    assert n == 1 and bypass.cache_info() is None


async def test_summary_and_windows_are_cached(vllm_backend: CaptionBackend, tiny_settings: Any,
                                              tmp_path: Path) -> None:
    video = str(make_video(tmp_path / "long.mp4", seed=32, frames=24, fps=2))
    counting = CountingBackend(vllm_backend)
    settings = _settings(tiny_settings, tmp_path, tmp_path / "cache").model_copy(update={
        "video": Settings(video={"allowed_roots": (tmp_path,), "fps": 1.0, "max_frames": 4,
                                 "min_frames": 2, "min_pixels": 28 * 28 * 4,
                                 "max_pixels": 112 * 84, "window_s": 4.0}).video})
    event = {"id": "w", "video": video, "options": {"summarize": True, "prompts": PROMPTS}}
    first, n = await _caption(counting, settings, event)
    assert n == 3 * 2 + 2  # 3 windows x 2 prompts, 2 summaries
    again, n = await _caption(counting, settings, {**event, "id": "w2"})
    assert n == 0 and again.captions["long"].text == first.captions["long"].text
    windows = again.window_captions()
    assert windows is not None and all(w.cache_hit for w in windows)
    assert [(w.start_s, w.end_s) for w in windows] == [(0.0, 4.0), (4.0, 8.0), (8.0, 12.0)]
    assert again.quality_fields()["cache"].hits == 8


async def test_one_clip_under_three_ids_and_two_paths_is_captioned_once_per_prompt(
        vllm_backend: CaptionBackend, tiny_settings: Any, kafka, topics, group_id,
        tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    original = make_video(tmp_path / "a" / "clip.mp4", seed=33)
    copy = tmp_path / "b.mp4"
    shutil.copyfile(original, copy)
    settings = _worker_settings(kafka, topics, group_id, tiny_settings, tmp_path)
    counting = CountingBackend(vllm_backend)
    refs = [str(original)] * 3 + [str(copy)] * 2
    async with running_worker(settings, counting) as (worker, _), \
            Publisher(kafka, topic=topics.input) as pub:
        from captionflow.schemas.events import VideoEvent

        for i, ref in enumerate(refs):
            await pub.send(VideoEvent(id=f"dup-{i}", video=[ref],
                                      options={"prompts": PROMPTS},
                                      metadata={"n": i}))
        records = await read_topic(kafka, topics.output, expected=5, timeout_s=120)
        await wait_all_committed(kafka, topics.input, group_id)
        registry = worker.metrics.registry
        lookups = {r: registry.get_sample_value("captionflow_cache_lookups_total",
                                                {"result": r}) for r in ("hit", "miss")}
    events = [decode_caption_event(r.value) for r in records]
    assert sorted(e.id for e in events) == [f"dup-{i}" for i in range(5)]
    assert len(counting.requests) == len(PROMPTS), counting.requests
    assert len({e.caption for e in events}) == 1
    assert len({orjson.dumps(e.captions) for e in events}) == 1
    assert all(e.metadata == {"n": int(e.id[-1])} and e.cache is not None for e in events)
    assert sorted(e.cache.hit for e in events) == [False, True, True, True, True]
    assert len({e.cache.key for e in events}) == 1
    assert lookups == {"hit": 8.0, "miss": 2.0}


def _worker_settings(kafka, topics, group_id, tiny_settings, root: Path) -> Settings:
    base = worker_settings(kafka, topics, group_id, tiny_settings, (root,))
    return base.model_copy(update={"cache": Settings(
        cache={"enabled": True, "store": str(root / "cache")}).cache})


async def test_batch_rerun_with_one_more_prompt_asks_only_the_new_prompt(
        vllm_backend: CaptionBackend, tiny_settings: Any, tmp_path: Path) -> None:
    from captionflow.batch.job import run_file

    video = str(make_video(tmp_path / "v.mp4", seed=34))
    settings = _settings(tiny_settings, tmp_path, tmp_path / "cache")
    counting = CountingBackend(vllm_backend)
    src, out = tmp_path / "rows.json", tmp_path / "out.json"
    src.write_bytes(orjson.dumps([{"video": [video], "options": {"prompts": {"a": "One."}}}]))
    await run_file(str(src), out, cache_type="json", settings=settings, backend=counting)
    assert len(counting.requests) == 1
    src.write_bytes(orjson.dumps([{"video": [video], "options": {
        "prompts": {"a": "One.", "b": "Two."}}}]))
    report = await run_file(str(src), out, cache_type="json", settings=settings,
                            backend=counting)
    assert report.captioned == 1 and len(counting.requests) == 2
    [row] = orjson.loads(out.read_bytes())
    assert set(row["captions"]) == {"a", "b"} and row["caption_cache"]["hits"] == 1

    # The DataFlow API shares the cache: the same rows through it make no request.
    from captionflow.dataflow import (
        FileStorage,
        LocalModelVLMServing_vllm,
        VideoToCaptionGenerator,
    )

    storage = FileStorage(first_entry_file_name=str(src), cache_path=str(tmp_path / "df"),
                          file_name_prefix="step", cache_type="json")
    serving = LocalModelVLMServing_vllm.from_backend(counting, settings)
    report = await VideoToCaptionGenerator(serving).arun(storage.step())
    assert report.captioned == 1 and len(counting.requests) == 2
