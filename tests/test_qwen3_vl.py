"""Qwen3-VL on the vllm backend: a tiny random-weight Qwen3-VL built locally, the prompt the
engine sees equal to the Hugging Face processor's (timestamps of a window in the whole
video), and a worker captioning events through it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from captionflow.producer import Publisher
from captionflow.schemas import decode_caption_event
from captionflow.serving.base import CaptionBackend, CaptionRequest
from captionflow.serving.engine_setup import tiny_cpu_settings
from captionflow.serving.prompt import (
    QWEN3_VL,
    build_messages,
    model_family,
    render_prompt,
    video_metadata,
)
from captionflow.serving.tiny_model import build_tiny_qwen3_vl
from captionflow.video.clip import Clip, VideoFacts
from tests.support.kafka_helpers import read_topic
from tests.support.worker_fixtures import running_worker, worker_settings

@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen3_vl(tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(scope="module")
def qwen3_settings(qwen3_dir: Path, serving_work_dir: Path):
    return tiny_cpu_settings(qwen3_dir, temperature=0.0, max_tokens=12,
                             work_dir=serving_work_dir)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def qwen3_backend(qwen3_settings) -> AsyncIterator[CaptionBackend]:
    from captionflow.serving.vllm_engine import VllmBackend

    backend = VllmBackend(qwen3_settings)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


def window_clip(start_frame: int, *, frames: int = 4, fps: float = 2.0) -> Clip:
    """Frames ``start_frame..`` of a 2 fps, 30 s video: a window that starts mid-video."""
    rng = np.random.default_rng(start_frame)
    pixels = rng.integers(0, 256, (frames, 64, 96, 3), dtype=np.uint8)
    indices = tuple(range(start_frame, start_frame + frames))
    return Clip(frames=pixels, frame_indices=indices,
                timestamps_s=tuple(i / fps for i in indices), sample_fps=fps,
                facts=VideoFacts(duration_s=30.0, source_fps=fps, total_frames=60,
                                 width=96, height=64, codec="rawvideo"))


def test_family_from_model_type() -> None:
    assert model_family("qwen3_vl") == model_family("qwen3_vl_moe") == QWEN3_VL
    assert model_family("qwen2_5_vl") != QWEN3_VL
    meta = video_metadata(window_clip(20), QWEN3_VL)
    assert meta["frames_indices"] == [20, 21, 22, 23] and meta["fps"] == 2.0
    # Qwen2.5-VL keeps the clip's own numbering (its rate drives the position ids).
    assert video_metadata(window_clip(20))["frames_indices"] == [0, 1, 2, 3]


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_prompt_token_ids_equal_the_hf_processor(
        qwen3_backend: CaptionBackend, qwen3_settings, qwen3_dir: Path) -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(qwen3_dir)
    assert type(processor).__name__ == "Qwen3VLProcessor"
    for start in (0, 20):
        clip = window_clip(start)
        result = await qwen3_backend.caption(CaptionRequest(f"q3-{start}", clip, "Describe."))
        messages = build_messages("Describe.", system_prompt=qwen3_settings.system_prompt)
        text = render_prompt(processor.tokenizer, messages)
        meta = {k: v for k, v in video_metadata(clip, QWEN3_VL).items()
                if k != "do_sample_frames"}
        hf = processor(text=[text], videos=[clip.frames], video_metadata=[meta],
                       do_sample_frames=False, return_tensors="np")
        assert list(result.prompt_token_ids) == hf["input_ids"][0].tolist()
        shown = processor.tokenizer.decode(result.prompt_token_ids)
        # Frame pairs at their time in the whole video: 10.0/10.5 s -> "<10.2 seconds>".
        first = (start / 2.0 + (start + 1) / 2.0) / 2
        assert f"<{first:.1f} seconds>" in shown, shown
        assert result.completion_tokens > 0


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_a_worker_captions_events_through_qwen3_vl(
        kafka, topics, group_id, qwen3_backend: CaptionBackend, qwen3_settings,
        caption_videos) -> None:
    settings = worker_settings(kafka, topics, group_id, qwen3_settings,
                               (caption_videos[0].parent,))
    inputs = [str(v) for v in caption_videos[:4]]
    async with Publisher(kafka, topic=topics.input) as pub:
        report = await pub.publish_inputs(inputs, id_from="uuid")
    sent = {ev.id: ev.reference for ev, _ in report.sent}
    async with running_worker(settings, qwen3_backend):
        records = await read_topic(kafka, topics.output, expected=4, timeout_s=120)
    captions = [decode_caption_event(r.value) for r in records]
    assert {c.id for c in captions} == set(sent)
    for c in captions:
        assert c.model == str(qwen3_settings.model)
        assert c.video == [sent[c.id]] and c.usage.completion_tokens > 0
        assert c.video_info is not None and c.video_info.frames_sampled == 4
    assert await read_topic(kafka, topics.dead_letter, expected=0, settle_s=0.2) == []
