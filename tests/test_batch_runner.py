"""The batch runner and the DataFlow-style API in-process on the shared CPU engine: captions
equal the worker's own for the same frames, bad rows carry their codes, and a rerun sends
nothing to the model again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from captionflow.batch.job import run_file
from captionflow.config import ServingSettings, Settings
from captionflow.dataflow import FileStorage, LocalModelVLMServing_vllm, VideoToCaptionGenerator
from captionflow.serving.base import CaptionBackend, CaptionRequest, CaptionResult
from tests.support.corpus import CorpusFile
from tests.support.worker_fixtures import reference_captions
from tests.test_batch_cli import mixed_rows

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]


class Counting(CaptionBackend):
    """The shared engine, counting what reaches it."""

    name = "counting"

    def __init__(self, inner: CaptionBackend) -> None:
        self.inner = inner
        self.requests: list[CaptionRequest] = []

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        pass  # the session owns the engine

    async def healthy(self) -> bool:
        return await self.inner.healthy()

    def model_info(self) -> dict[str, Any]:
        return self.inner.model_info()

    async def caption(self, request: CaptionRequest) -> CaptionResult:
        self.requests.append(request)
        return await self.inner.caption(request)


def batch_settings(serving: ServingSettings, root: Path) -> Settings:
    # The quality gate off: one request per row (the tiny model's captions are truncated).
    # Images as the CPU default has them (image 0: a row's image is carried through unsent),
    # although the shared engine would take two.
    serving = serving.model_copy(update={"limit_mm_per_prompt": {"image": 0, "video": 1}})
    return Settings(serving=serving, video={
        "allowed_roots": (root,), "fps": 2.0, "max_frames": 4, "min_frames": 2,
        "min_pixels": 28 * 28 * 4, "max_pixels": 112 * 84},
        worker={"quality_gate_retries": 0})


async def test_rows_are_captioned_like_the_worker_and_a_rerun_captions_nothing_twice(
        tmp_path: Path, vllm_backend: CaptionBackend, tiny_settings: ServingSettings,
        video_corpus: dict[str, CorpusFile], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rows, bad = mixed_rows(tmp_path, video_corpus)
    (tmp_path / "rows.json").write_bytes(orjson.dumps(rows))
    settings = batch_settings(tiny_settings, tmp_path)
    backend = Counting(vllm_backend)
    out_path = tmp_path / "out" / "step1.json"

    report = await run_file("rows.json", out_path, cache_type="json", settings=settings,
                            backend=backend, concurrency=4)
    assert (report.captioned, report.skipped, report.failed_total) == (3, 0, 3)
    assert len(backend.requests) == 3
    out = orjson.loads(out_path.read_bytes())
    assert {i: r["error"]["code"] for i, r in enumerate(out) if r.get("error")} == bad

    # Same frames and serving code as the worker: each caption equals the video captioned
    # alone by the backend (greedy), rows 0 and 5 with the default prompt.
    videos = [tmp_path / "videos" / "good1.mp4", tmp_path / "videos" / "good3.mp4"]
    expected = await reference_captions(vllm_backend, settings, videos)
    assert out[0]["caption"] == expected[str(videos[0])]
    assert out[5]["caption"] == expected[str(videos[1])]
    assert out[2]["caption"] and out[2]["conversation"][0]["value"] == "What moves?"

    before = out_path.read_bytes()
    again = await run_file("rows.json", out_path, cache_type="json", settings=settings,
                           backend=backend, concurrency=4)
    assert (again.captioned, again.skipped, again.failed_total) == (0, 3, 3)
    assert len(backend.requests) == 3  # nothing new reached the model
    assert out_path.read_bytes() == before


async def test_dataflow_operator_writes_the_next_step_file_and_resumes(
        tmp_path: Path, vllm_backend: CaptionBackend, tiny_settings: ServingSettings,
        video_corpus: dict[str, CorpusFile], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rows, bad = mixed_rows(tmp_path, video_corpus)
    (tmp_path / "sample_data.json").write_bytes(orjson.dumps(rows))
    backend = Counting(vllm_backend)
    serving = LocalModelVLMServing_vllm.from_backend(
        backend, batch_settings(tiny_settings, tmp_path))

    async def pipeline() -> Any:
        storage = FileStorage("sample_data.json", cache_path="./cache",
                              file_name_prefix="video_caption", cache_type="jsonl")
        return await VideoToCaptionGenerator(vlm_serving=serving).arun(storage=storage.step())

    report = await pipeline()
    assert (report.captioned, report.failed_total) == (3, 3)
    out_path = tmp_path / "cache" / "video_caption_step1.jsonl"
    out = [orjson.loads(line) for line in out_path.read_bytes().splitlines()]
    assert [bool(r.get("error")) for r in out] == [i in bad for i in range(len(rows))]
    assert len(backend.requests) == 3

    before = out_path.read_bytes()
    report = await pipeline()
    assert (report.captioned, report.skipped) == (0, 3)
    assert len(backend.requests) == 3
    assert out_path.read_bytes() == before
