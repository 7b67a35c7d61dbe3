"""Images reach the model: the shared vLLM CPU engine (it allows 2 images per prompt) against
the transformers reference, and through a real worker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

from captionflow.captioning import Attempts, caption_event
from captionflow.config import Settings
from captionflow.errors import ErrorCode, InvalidRequestError
from captionflow.schemas import decode_caption_event, decode_dead_letter_event
from captionflow.schemas.events import VideoEvent
from captionflow.serving.base import CaptionRequest
from captionflow.video.images import load_images
from captionflow.video.source import load_clips
from tests.support.kafka_helpers import read_topic
from tests.support.model_fixtures import synthetic_clip
from tests.support.worker_fixtures import make_video, running_worker, worker_settings
from tests.test_images import write_image

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600),
              pytest.mark.filterwarnings("ignore:Unclosed context:ResourceWarning"),
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]
session_loop = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("image-media")
    make_video(root / "v.mp4", seed=7)
    write_image(root / "a.png", 1)
    write_image(root / "b.jpg", 2, height=150, width=100, fmt="JPEG")
    return root


def settings_for(root: Path, serving, **overrides) -> Settings:
    return Settings(serving=serving,
                    video={"allowed_roots": (root,), "fps": 2.0, "max_frames": 8,
                           "min_frames": 2, "min_pixels": 28 * 28 * 4,
                           "max_pixels": 112 * 84, **overrides},
                    # One request per caption: captions are compared with single requests.
                    worker={"quality_gate_retries": 0})


async def caption_with(backend, event: VideoEvent, settings: Settings):
    async def clips(reference, overrides):
        return await asyncio.to_thread(load_clips, reference, settings.video, overrides)
    return await caption_event(event, clips=clips, caption=backend.caption,
                               settings=settings, attempts=Attempts(settings.worker))


@session_loop
@pytest.mark.parametrize(("images", "fps"), [(["a.png"], 2.0), (["a.png", "b.jpg"], 2.0),
                                              (["b.jpg", "a.png"], 0.5)])
async def test_event_images_reach_vllm_as_transformers_sees_them(
        vllm_backend, hf_backend_sync, tiny_settings, media, images, fps):
    settings = settings_for(media, tiny_settings, fps=fps)
    event = VideoEvent(id="img", video=str(media / "v.mp4"), image=images)
    got = await caption_with(vllm_backend, event, settings)
    reference = await caption_with(hf_backend_sync, event, settings)
    [result], [want] = got.results, reference.results

    # The HF processor's ids for the same clip and images are the engine's prompt.
    [clip] = load_clips(str(media / "v.mp4"), settings.video)
    loaded = load_images(images, settings.video)
    inputs = hf_backend_sync.processor_inputs(CaptionRequest("p", clip, "", images=loaded))
    assert list(result.prompt_token_ids) == inputs["input_ids"][0].tolist()
    config = hf_backend_sync._model.config
    ids = list(result.prompt_token_ids)
    assert inputs["image_grid_thw"].shape[0] == len(images)
    assert ids.count(config.image_token_id) == int(
        inputs["image_grid_thw"].prod(-1).sum()) // 4
    assert ids.index(config.image_token_id) < ids.index(config.video_token_id)
    # Greedy float32: the same tokens as transformers.
    assert result.prompt_token_ids == want.prompt_token_ids
    assert result.token_ids == want.token_ids and result.completion_tokens > 0

    # Without the images the prompt is another one.
    plain = await caption_with(vllm_backend,
                               VideoEvent(id="plain", video=str(media / "v.mp4")), settings)
    assert len(plain.results[0].prompt_token_ids) < len(ids)


@pytest.mark.parametrize(("frames", "fps", "n_images"), [(4, 2.0, 1), (8, 0.5, 2), (8, 1.0, 1)])
def test_transformers_mrope_positions_with_images_equal_vllms(
        hf_backend_sync, frames, fps, n_images, media, tiny_settings):
    import types

    import torch
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    settings = settings_for(media, tiny_settings)
    images = load_images(["a.png", "b.jpg"][:n_images], settings.video)
    inputs = hf_backend_sync.processor_inputs(CaptionRequest(
        "pos", synthetic_clip(3, frames=frames, fps=fps), "", images=images))
    config = hf_backend_sync._model.config
    merge = config.vision_config.spatial_merge_size
    ids = inputs["input_ids"]
    tokens = ids[0].tolist()
    items = []
    offsets = [i for i, tok in enumerate(tokens) if tok == config.image_token_id and
               (i == 0 or tokens[i - 1] != config.image_token_id)]
    for offset, (t, h, w) in zip(offsets, inputs["image_grid_thw"].tolist(), strict=True):
        items.append((offset, t, h // merge, w // merge, 1.0))
    t, h, w = inputs["video_grid_thw"][0].tolist()
    factor = float(inputs["second_per_grid_ts"][0]) * config.vision_config.tokens_per_second
    items.append((tokens.index(config.video_token_id), t, h // merge, w // merge, factor))
    grid = types.SimpleNamespace(iter_mm_grid_thw=lambda features: iter(items))
    want, want_delta = Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions(
        grid, tokens, [])
    got, got_delta = hf_backend_sync._model.model.get_rope_index(
        ids, image_grid_thw=inputs["image_grid_thw"], video_grid_thw=inputs["video_grid_thw"],
        attention_mask=inputs["attention_mask"], second_per_grid_ts=inputs["second_per_grid_ts"],
        mm_token_type_ids=inputs.get("mm_token_type_ids"))
    assert torch.equal(got[:, 0], want.to(got.dtype))
    assert int(got_delta) == want_delta


@session_loop
async def test_worker_captions_image_events_and_dead_letters_a_missing_image(
        kafka, topics, group_id, vllm_backend, tiny_settings, media):
    settings = worker_settings(kafka, topics, group_id, tiny_settings, (media,))
    video = str(media / "v.mp4")
    good = {"id": "good", "video": video, "image": [str(media / "a.png")]}
    missing = {"id": "missing", "video": video, "image": [str(media / "nope.png")]}
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
    await producer.start()
    try:
        for event in (good, missing):
            await producer.send_and_wait(topics.input, orjson.dumps(event),
                                         key=event["id"].encode())
    finally:
        await producer.stop()
    async with running_worker(settings, vllm_backend):
        [out] = await read_topic(kafka, topics.output, expected=1, timeout_s=120)
        [dead] = await read_topic(kafka, topics.dead_letter, expected=1, timeout_s=60)
    caption = decode_caption_event(out.value)
    assert caption.id == "good" and caption.image == good["image"]
    expected = await caption_with(vllm_backend, VideoEvent(**good), settings)
    assert caption.caption == expected.text
    assert caption.usage.prompt_tokens == expected.prompt_tokens
    letter = decode_dead_letter_event(dead.value)
    assert letter.id == "missing" and letter.error.code == ErrorCode.VIDEO_NOT_FOUND
    assert "nope.png" in letter.error.message


@session_loop
async def test_more_images_than_the_engine_allows_are_refused_as_the_requests_fault(
        vllm_backend, media, tiny_settings):
    # Sent straight to the backend, past captionflow's own check of the limit
    # (test_images.py): vLLM refuses, and the refusal is the request's, not the engine's.
    assert vllm_backend.settings.limit_mm_per_prompt["image"] == 2
    images = load_images(["a.png", "b.jpg", "a.png"], settings_for(media, tiny_settings).video)
    with pytest.raises(InvalidRequestError):
        await vllm_backend.caption(CaptionRequest("refused", synthetic_clip(0), "",
                                                  images=images))
    ok = await vllm_backend.caption(CaptionRequest("after", synthetic_clip(0), ""))
    assert isinstance(ok.text, str)
