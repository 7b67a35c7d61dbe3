"""Model fixtures: the tiny Qwen2.5-VL checkpoint and ONE shared vLLM CPU engine per session.

The engine takes ~15-50 s to start and ~2.3 GiB, so every test that only needs "an engine"
shares ``vllm_backend`` (session scope, session event loop: mark such tests
``@pytest.mark.asyncio(loop_scope="session")``). Tests that kill an engine start their own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from captionflow.serving.engine_setup import prepare_vllm_environment, tiny_cpu_settings
from captionflow.serving.tiny_model import build_tiny_model
from captionflow.video.clip import Clip, VideoFacts


def synthetic_clip(seed: int, *, frames: int = 4, height: int = 56, width: int = 84,
                   fps: float = 2.0) -> Clip:
    """A deterministic clip of random frames; distinct seeds give distinct videos."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    return Clip(
        frames=pixels, frame_indices=tuple(range(frames)),
        timestamps_s=tuple(i / fps for i in range(frames)), sample_fps=fps,
        facts=VideoFacts(duration_s=frames / fps, source_fps=fps, total_frames=frames,
                         width=width, height=height, codec="rawvideo"))


@pytest.fixture(scope="session")
def serving_work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vLLM's RPC sockets and temp files for the whole session (its cache: conftest.py)."""
    root = tmp_path_factory.mktemp("vllm-work")
    prepare_vllm_environment(root)
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_model_dir_8k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with an 8192-token context, below the seed's max_model_len (51200)."""
    return build_tiny_model(tmp_path_factory.mktemp("models-8k"), max_position_embeddings=8192)


# Images per prompt for the shared engine (the CPU default is 0): one engine serves the
# image tests too, instead of a second engine start (~25 s on 2 cores).
IMAGE_LIMIT = {"image": 2, "video": 1}


@pytest.fixture(scope="session")
def tiny_settings(tiny_model_dir: Path, serving_work_dir: Path):
    """Greedy CPU-engine settings for the tiny model (short outputs keep tests fast), with
    16 sequences at once so that one engine also shows a worker filling it past the old
    2 x max_batch_size cap (test_fleet.py), and 2 images per prompt (test_images_engine.py)."""
    return tiny_cpu_settings(tiny_model_dir, temperature=0.0, max_tokens=12,
                             work_dir=serving_work_dir, max_num_seqs=16,
                             limit_mm_per_prompt=IMAGE_LIMIT)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def vllm_backend(tiny_settings) -> AsyncIterator:
    from captionflow.serving.vllm_engine import VllmBackend

    backend = VllmBackend(tiny_settings)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


@pytest.fixture(scope="session")
def hf_backend_sync(tiny_settings):
    """A started transformers backend, usable from any event loop (it only needs a thread)."""
    import asyncio

    from captionflow.serving.hf_transformers import TransformersBackend

    backend = TransformersBackend(tiny_settings)
    asyncio.run(backend.start())
    yield backend
    asyncio.run(backend.close())
