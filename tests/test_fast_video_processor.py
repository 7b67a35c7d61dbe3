"""The fast Qwen2-VL video preprocessing gives exactly the stock tensors, and runs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from captionflow.serving import fast_video_processor
from tests.support.model_fixtures import synthetic_clip

RAW = {"do_rescale": False, "do_normalize": False}  # what vLLM 0.32 asks for by default


@pytest.fixture
def stock_then_fast() -> Iterator[None]:
    """Start from the stock processor and leave the patch as the session had it. vLLM
    loads its plugins (captionflow's installs the patch) once per process: load them first,
    or a test's first vLLM call would install the patch mid-test."""
    with contextlib.suppress(ImportError):
        from vllm.plugins import load_general_plugins

        load_general_plugins()
    was_installed = fast_video_processor.installed()
    fast_video_processor.uninstall()
    yield
    if was_installed:
        fast_video_processor.install()
    else:
        fast_video_processor.uninstall()


@pytest.fixture
def fast_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Shapes the fast path patchified: proof that it ran rather than fell back."""
    calls: list[tuple[int, ...]] = []
    real = fast_video_processor._patch_order

    def spy(video: Any, *args: Any) -> np.ndarray:
        calls.append(tuple(video.shape))
        return real(video, *args)

    monkeypatch.setattr(fast_video_processor, "_patch_order", spy)
    return calls


def _frames(seed: int, frames: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3),
                                                dtype=np.uint8)


def _stock_and_fast(processor: Any, videos: list[np.ndarray],
                    **kwargs: Any) -> tuple[Any, Any]:
    stock = processor(videos=videos, return_tensors="pt", **kwargs)
    assert fast_video_processor.install()
    try:
        fast = processor(videos=videos, return_tensors="pt", **kwargs)
    finally:
        fast_video_processor.uninstall()
    return stock, fast


def _assert_identical(stock: Any, fast: Any) -> None:
    assert set(stock.keys()) == set(fast.keys())
    for key in stock:
        assert stock[key].dtype == fast[key].dtype, key
        assert torch.equal(stock[key], fast[key]), key


@pytest.mark.usefixtures("stock_then_fast")
@pytest.mark.parametrize("kwargs", [RAW, {}], ids=["raw-pixels", "rescale-normalize"])
@pytest.mark.parametrize("shapes", [
    [(20, 448, 784)],                  # on the 28-pixel grid: no resize
    [(6, 448, 796)],                   # the processor resizes to 784 wide
    [(4, 336, 336)],                   # below min_pixels: resized up
    [(4, 112, 196), (6, 448, 784), (4, 112, 196)],  # several videos, two shapes
], ids=["on-grid", "resized", "upscaled", "mixed"])
def test_fast_path_is_bit_identical_and_runs(kwargs: dict[str, Any],
                                             shapes: list[tuple[int, int, int]],
                                             fast_calls: list[tuple[int, ...]]) -> None:
    from transformers import Qwen2VLVideoProcessor

    processor = Qwen2VLVideoProcessor(cap_pixels_per_frame=False)
    videos = [_frames(i, *shape) for i, shape in enumerate(shapes)]
    stock, fast = _stock_and_fast(processor, videos, **kwargs)
    _assert_identical(stock, fast)
    assert len(fast_calls) == len(videos)


@pytest.mark.usefixtures("stock_then_fast")
def test_odd_frame_counts_and_other_inputs_use_the_stock_code(
        fast_calls: list[tuple[int, ...]]) -> None:
    from transformers import Qwen2VLVideoProcessor

    processor = Qwen2VLVideoProcessor(cap_pixels_per_frame=False)
    odd = [_frames(0, 7, 112, 196)]  # stock pads with the last frame
    floats = [_frames(1, 4, 112, 196).astype(np.float32)]
    for videos, kwargs in [(odd, RAW), (odd, {}), (floats, {}),
                           (odd, {"do_rescale": True, "do_normalize": False})]:
        stock, fast = _stock_and_fast(processor, videos, **kwargs)
        _assert_identical(stock, fast)
    scalar_mean = Qwen2VLVideoProcessor(cap_pixels_per_frame=False, image_mean=0.5,
                                        image_std=0.5)
    _assert_identical(*_stock_and_fast(scalar_mean, [_frames(2, 4, 112, 196)]))
    assert fast_calls == []


@pytest.mark.usefixtures("stock_then_fast")
def test_subclass_with_its_own_preprocess_gets_contiguous_tensors() -> None:
    from transformers import Qwen2VLVideoProcessor

    seen: list[bool] = []

    class OwnPreprocess(Qwen2VLVideoProcessor):
        def _preprocess(self, videos: list[Any], **kwargs: Any) -> Any:
            seen.extend(v.is_contiguous() for v in videos)
            return super()._preprocess(videos, **kwargs)

    assert fast_video_processor.install()
    OwnPreprocess(cap_pixels_per_frame=False)(videos=[_frames(0, 4, 112, 196)],
                                              return_tensors="pt")
    assert seen == [True]


def test_install_is_idempotent_and_uninstall_restores(stock_then_fast: None) -> None:
    from transformers import Qwen2VLVideoProcessor

    stock = Qwen2VLVideoProcessor._preprocess
    assert fast_video_processor.install() and fast_video_processor.install()
    assert Qwen2VLVideoProcessor._preprocess is fast_video_processor._preprocess
    fast_video_processor.uninstall()
    assert Qwen2VLVideoProcessor._preprocess is stock
    assert not fast_video_processor.installed()


@pytest.mark.usefixtures("stock_then_fast")
def test_vllm_multimodal_processor_output_is_unchanged(
        tiny_model_dir: Path, fast_calls: list[tuple[int, ...]]) -> None:
    """vLLM 0.32's Qwen2.5-VL processor as the engine's frontend runs it (raw pixels,
    normalized on the device), with Qwen2.5-VL's own pixel bounds so a 448p clip from our
    sampling reaches the processor on its grid: the same pixel values, grid, M-RoPE
    timing and prompt token ids with the fast path as without."""
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    config = ModelConfig(model=str(tiny_model_dir), mm_processor_cache_gb=0,
                         mm_processor_kwargs={"min_pixels": 128 * 28 * 28,
                                              "max_pixels": 768 * 28 * 28,
                                              "cap_pixels_per_frame": False})
    processor = MULTIMODAL_REGISTRY.create_processor(config)
    clip = synthetic_clip(3, frames=6, height=448, width=784)
    prompt = "<|vision_start|><|video_pad|><|vision_end|>Describe the video."

    def run() -> Any:
        items = processor.info.parse_mm_data({"video": (clip.frames, clip.vllm_metadata())})
        return processor(prompt, items)

    stock = run()
    assert fast_video_processor.install()
    fast = run()
    assert fast_calls == [(6, 3, 448, 784)]
    assert fast["prompt_token_ids"] == stock["prompt_token_ids"]
    stock_item, fast_item = stock["mm_kwargs"]["video"][0], fast["mm_kwargs"]["video"][0]
    assert set(stock_item.keys()) == set(fast_item.keys())
    assert stock_item["pixel_values_videos"].data.dtype == torch.uint8
    for key in stock_item:
        assert torch.equal(stock_item[key].data, fast_item[key].data), key


def test_vllm_loads_the_plugin_from_its_entry_point(stock_then_fast: None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """What a `vllm serve` started in this environment does in each of its processes
    (tests/test_serving_openai_live.py checks the real server's API process)."""
    from vllm.plugins import DEFAULT_PLUGINS_GROUP, load_plugins_by_group

    monkeypatch.setenv("VLLM_PLUGINS", "some_other_plugin")
    assert "captionflow_fast_video" not in load_plugins_by_group(DEFAULT_PLUGINS_GROUP)
    monkeypatch.delenv("VLLM_PLUGINS")
    plugins = load_plugins_by_group(DEFAULT_PLUGINS_GROUP)
    assert not fast_video_processor.installed()
    plugins["captionflow_fast_video"]()
    assert fast_video_processor.installed()
