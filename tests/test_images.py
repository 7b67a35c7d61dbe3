"""An event's ``image`` references: loading, the prompt, and caption_event's rules (no engine)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captionflow.captioning import Attempts, caption_event
from captionflow.config import ServingSettings, Settings, VideoSettings, WorkerSettings
from captionflow.errors import (
    InvalidRequestError,
    VideoForbiddenError,
    VideoNotFoundError,
    VideoUnreadableError,
)
from captionflow.schemas.events import VideoEvent
from captionflow.serving.base import CaptionRequest, CaptionResult
from captionflow.serving.openai_client import OpenAIBackend
from captionflow.serving.prompt import build_messages
from captionflow.video.images import load_images
from tests.support.model_fixtures import synthetic_clip


def write_image(path: Path, seed: int, *, height: int = 56, width: int = 84,
                fmt: str = "PNG") -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels, mode="RGB").save(path, format=fmt)
    return pixels


def video_settings(root: Path, **overrides) -> VideoSettings:
    values = {"allowed_roots": (root,), "min_pixels": 28 * 28, "max_pixels": 112 * 112,
              **overrides}
    return VideoSettings(**values)


def test_png_at_a_model_size_comes_back_exactly(tmp_path: Path) -> None:
    pixels = write_image(tmp_path / "a.png", 1)
    [image] = load_images(["a.png"], video_settings(tmp_path))
    assert image.dtype == np.uint8 and image.shape == (56, 84, 3)
    assert np.array_equal(image, pixels)
    # file:// and absolute paths name the same file.
    [again] = load_images([(tmp_path / "a.png").as_uri()], video_settings(tmp_path))
    assert np.array_equal(again, pixels)


def test_images_are_resized_to_28_multiples_within_the_pixel_bounds(tmp_path: Path) -> None:
    write_image(tmp_path / "big.jpg", 2, height=300, width=410, fmt="JPEG")
    write_image(tmp_path / "small.png", 3, height=10, width=17)
    settings = video_settings(tmp_path)
    big, small = load_images(["big.jpg", "small.png"], settings)
    for image in (big, small):
        h, w, c = image.shape
        assert c == 3 and h % 28 == 0 and w % 28 == 0
        assert settings.min_pixels <= h * w <= settings.max_pixels
    assert big.shape[1] > big.shape[0]  # the aspect ratio is kept
    # An RGBA or grey image becomes RGB.
    Image.new("LA", (56, 56), (128, 200)).save(tmp_path / "grey.png")
    [grey] = load_images(["grey.png"], settings)
    assert grey.shape == (56, 56, 3) and (grey == 128).all()


def test_image_errors_are_the_fetch_and_decode_errors(tmp_path: Path) -> None:
    settings = video_settings(tmp_path)
    (tmp_path / "junk.png").write_bytes(b"this is not an image")
    with pytest.raises(VideoNotFoundError):
        load_images(["missing.png"], settings)
    with pytest.raises(VideoForbiddenError):
        load_images(["/etc/hostname"], settings)
    with pytest.raises(VideoUnreadableError):
        load_images(["junk.png"], settings)
    with pytest.raises(InvalidRequestError):
        load_images(["  "], settings)
    assert load_images([], settings) == ()


def test_images_come_before_the_video_in_the_user_turn() -> None:
    content = build_messages("Compare.", images=2)[1]["content"]
    assert [part["type"] for part in content] == ["image", "image", "video", "text"]
    assert [p["type"] for p in build_messages("")[1]["content"]] == ["video", "text"]


def test_openai_body_sends_images_as_png_data_urls_before_the_video() -> None:
    images = tuple(np.random.default_rng(i).integers(0, 256, (28, 56, 3), dtype=np.uint8)
                   for i in range(2))
    backend = OpenAIBackend(ServingSettings(backend="openai"))
    body = backend.request_body(CaptionRequest("r", synthetic_clip(0), "", images=images))
    content = body["messages"][-1]["content"]
    assert [part["type"] for part in content] == ["image_url", "image_url", "video_url", "text"]
    for part, image in zip(content[:2], images, strict=True):
        url = part["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert np.array_equal(np.asarray(decoded), image)


def _settings(root: Path, limit: int) -> Settings:
    return Settings(video=video_settings(root),
                    serving=ServingSettings(limit_mm_per_prompt={"image": limit, "video": 1}),
                    worker=WorkerSettings(max_attempts=1))


def _run(event: VideoEvent, settings: Settings, *, windows: int = 1):
    sent: list[CaptionRequest] = []
    asked: list[str] = []

    async def clips(reference, overrides):
        asked.append(reference)
        if windows == 1:
            return [synthetic_clip(0)]
        return [dataclasses.replace(synthetic_clip(i), window_index=i) for i in range(windows)]

    async def caption(request: CaptionRequest) -> CaptionResult:
        sent.append(request)
        return CaptionResult(request.request_id, "text", "stop", 1, 1)

    result = asyncio.run(caption_event(event, clips=clips, caption=caption, settings=settings,
                                       attempts=Attempts(settings.worker)))
    return result, sent, asked


def test_caption_event_sends_the_images_with_every_window(tmp_path: Path) -> None:
    first = write_image(tmp_path / "a.png", 1)
    second = write_image(tmp_path / "b.png", 2, height=84, width=56)
    event = VideoEvent(id="e1", video="v.mp4", image=["a.png", "b.png"])
    _, sent, _ = _run(event, _settings(tmp_path, 2), windows=3)
    assert len(sent) == 3
    for request in sent:
        assert len(request.images) == 2
        assert np.array_equal(request.images[0], first)
        assert np.array_equal(request.images[1], second)


def test_caption_event_without_images_sends_none(tmp_path: Path) -> None:
    _, sent, _ = _run(VideoEvent(id="e0", video="v.mp4"), _settings(tmp_path, 2))
    assert sent[0].images == ()


def test_image_limit_zero_carries_images_through_without_sending_them(tmp_path: Path) -> None:
    # The default (image 0): as before images reached the model, the event is captioned and
    # its references are not even opened (a missing one does not fail it).
    event = VideoEvent(id="e2", video="v.mp4", image=["missing.png"])
    result, sent, _ = _run(event, _settings(tmp_path, 0))
    assert result.text == "text" and sent[0].images == ()
    assert ServingSettings().limit_mm_per_prompt["image"] == 0


def test_more_images_than_the_limit_fail_the_event(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", 1)
    event = VideoEvent(id="e3", video="v.mp4", image=["a.png", "a.png"])
    with pytest.raises(InvalidRequestError, match=r"serving\.limit_mm_per_prompt") as info:
        _run(event, _settings(tmp_path, 1))
    assert info.value.code == "invalid_request"


def test_missing_image_is_video_not_found_before_any_decode(tmp_path: Path) -> None:
    event = VideoEvent(id="e4", video="v.mp4", image=["missing.png"])
    asked: list[str] = []

    async def clips(reference, overrides):
        asked.append(reference)
        return [synthetic_clip(0)]

    async def caption(request):
        raise AssertionError("nothing may be captioned")

    settings = _settings(tmp_path, 2)
    with pytest.raises(VideoNotFoundError) as info:
        asyncio.run(caption_event(event, clips=clips, caption=caption, settings=settings,
                                  attempts=Attempts(settings.worker)))
    assert info.value.code == "video_not_found" and asked == []
