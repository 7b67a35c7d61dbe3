"""What several benchmarks share: the tiny model on the vLLM CPU engine in a fresh work dir,
distinct sample videos, and RSS summed over a process tree."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import psutil

from captionflow.config import ServingSettings
from captionflow.samples import SCENES, make_sample_video
from captionflow.serving.engine_setup import prepare_vllm_environment, tiny_cpu_settings
from captionflow.serving.tiny_model import build_tiny_model


def engine_work_dir(prefix: str, model: str | None, *,
                    max_tokens: int) -> tuple[Path, ServingSettings]:
    """A fresh work dir with vLLM's files inside it, and greedy serving settings for
    ``model`` (the tiny random-weight model built there when None)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ.setdefault("VLLM_RPC_BASE_PATH", tempfile.mkdtemp(prefix="cf-rpc-"))
    prepare_vllm_environment(work / "vllm")
    model = model or str(build_tiny_model(work / "models"))
    return work, tiny_cpu_settings(model, temperature=0.0, max_tokens=max_tokens)


def sample_videos(work: Path, count: int) -> list[Path]:
    """``count`` sample clips whose colours differ, so their captions differ."""
    videos = []
    for i in range(count):
        _, background, square = SCENES[i % len(SCENES)]
        shifted = tuple((c + 37 * i) % 256 for c in background)
        videos.append(make_sample_video(work / f"v{i}.mp4", shifted, square))  # type: ignore[arg-type]
    return videos


def tree_rss_bytes(process: psutil.Process, *, children: bool = True) -> int:
    """RSS of ``process`` and, with ``children``, of every descendant still alive."""
    try:
        procs = [process, *(process.children(recursive=True) if children else [])]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total
