"""Batch mode without an engine: file layout, resume matching, the seed API's parameter
mapping and precedence, and a runner over real videos with a stand-in model."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from captionflow.batch import FileStorage, RowKeys, already_captioned, read_rows, run_file
from captionflow.config import Settings
from captionflow.dataflow import LocalModelVLMServing_vllm, VideoToCaptionGenerator
from captionflow.errors import ConfigError, EngineDeadError, InternalError
from captionflow.serving.base import CaptionBackend, CaptionRequest, CaptionResult
from tests.support.worker_fixtures import make_video

KEYS = RowKeys()


class Echo(CaptionBackend):
    """A stand-in model: the caption names the frames it was given."""

    name = "echo"

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls = 0
        self.started = False
        self.fail_after = fail_after

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        pass

    async def healthy(self) -> bool:
        return True

    def model_info(self) -> dict[str, Any]:
        return {"model": "echo"}

    async def caption(self, request: CaptionRequest) -> CaptionResult:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise EngineDeadError("engine gone")
        await asyncio.sleep(0)
        return CaptionResult(request.request_id, f"{request.clip.num_frames} frames: "
                             f"{request.prompt}", "stop", 1, 1)


def test_file_storage_steps_like_dataflow(tmp_path: Path) -> None:
    first = tmp_path / "in.json"
    first.write_text('[{"video": ["a.mp4"]}]')
    storage = FileStorage(str(first), cache_path=str(tmp_path / "cache"),
                          file_name_prefix="video_caption", cache_type="jsonl")
    one = storage.step()
    assert one.read_path == first
    assert one.write_path == tmp_path / "cache" / "video_caption_step1.jsonl"
    assert one.read() == [{"video": ["a.mp4"]}]
    one.write([{"video": ["a.mp4"], "caption": "x"}])
    two = storage.step()
    assert two.read_path == one.write_path
    assert two.write_path.name == "video_caption_step2.jsonl"
    assert two.read() == [{"video": ["a.mp4"], "caption": "x"}]
    with pytest.raises(ConfigError, match="storage.step"):
        _ = FileStorage(str(first)).read_path
    with pytest.raises(ConfigError, match="json, jsonl, csv, parquet"):
        FileStorage(str(first), cache_type="xlsx")
    assert FileStorage(str(first)).step().write_path == Path(
        "./cache/dataflow_cache_step_step1.json")


def test_resume_matches_by_id_else_position_and_same_video() -> None:
    rows = [{"video": ["a"]}, {"video": ["b"]}, {"id": "c", "video": ["c"]},
            {"video": ["d"]}, {"video": ["e"]}]
    previous = [
        {"video": ["a"], "caption": "A"},                       # same place, same video
        {"video": ["x"], "caption": "X"},                       # the video changed: rerun
        {"video": ["e"], "caption": None, "error": {"code": "video_not_found"}},
        {"video": ["d"]},                                       # unfinished: rerun
        {"id": "c", "video": ["c"], "caption": "C"},            # by id, wherever it is
    ]
    assert {i: p["caption"] for i, p in already_captioned(rows, previous, KEYS).items()} == {
        0: "A", 2: "C"}


def test_jsonl_line_that_is_not_json_fails_that_row_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths are read from the current directory
    make_video(tmp_path / "a.mp4", seed=1)
    src = tmp_path / "rows.jsonl"
    src.write_text('{"video": ["a.mp4"]}\n{not json\n')
    backend = Echo()
    report = asyncio.run(run_file(src, tmp_path / "out.jsonl", cache_type="jsonl",
                                  settings=Settings(), backend=backend))
    assert (report.captioned, dict(report.failed)) == (1, {"malformed_json": 1})
    out = read_rows(tmp_path / "out.jsonl")
    assert out[0]["caption"].endswith("Please describe the video in detail.")
    assert out[1]["error"]["code"] == "malformed_json" and out[1]["line"] == "{not json"


def test_a_dead_engine_stops_the_run_after_a_checkpoint_and_the_rerun_finishes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rows = []
    for n in range(6):
        make_video(tmp_path / f"v{n}.mp4", seed=n)
        rows.append({"video": [f"v{n}.mp4"]})
    src = tmp_path / "rows.json"
    src.write_bytes(orjson.dumps(rows))
    out = tmp_path / "out.json"
    with pytest.raises(EngineDeadError):
        asyncio.run(run_file(src, out, cache_type="json", settings=Settings(),
                             backend=Echo(fail_after=2), concurrency=1))
    partial = read_rows(out)
    assert [isinstance(r.get("caption"), str) for r in partial] == [True, True] + [False] * 4
    backend = Echo()
    report = asyncio.run(run_file(src, out, cache_type="json", settings=Settings(),
                                  backend=backend, concurrency=3))
    assert (report.skipped, report.captioned, backend.calls) == (2, 4, 4)


def test_nothing_to_caption_starts_no_backend(tmp_path: Path) -> None:
    src = tmp_path / "rows.json"
    src.write_text('[{"video": ["missing.mp4"]}, {"video": []}]')
    backend = Echo()
    report = asyncio.run(run_file(src, tmp_path / "o.json", cache_type="json",
                                  settings=Settings(), backend=backend))
    assert dict(report.failed) == {"video_not_found": 1, "schema_invalid": 1}
    assert not backend.started and not report.engine_started


def test_seed_parameters_map_onto_serving_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in __import__("os").environ if k.startswith("CAPTIONFLOW_")]:
        monkeypatch.delenv(key)
    serving = LocalModelVLMServing_vllm(
        hf_model_name_or_path="some/model", hf_cache_dir="/models", vllm_temperature=0.2,
        vllm_top_p=0.5, vllm_max_tokens=64, vllm_top_k=5, vllm_repetition_penalty=1.1,
        vllm_seed=7, vllm_max_model_len=8192, vllm_gpu_memory_utilization=0.5,
        dtype="float32", kv_cache_memory_bytes=1 << 28).settings.serving
    assert (serving.model, str(serving.download_dir), serving.temperature, serving.top_p,
            serving.max_tokens, serving.top_k, serving.repetition_penalty, serving.seed,
            serving.max_model_len, serving.gpu_memory_utilization, serving.dtype,
            serving.kv_cache_memory_bytes) == (
        "some/model", "/models", 0.2, 0.5, 64, 5, 1.1, 7, 8192, 0.5, "float32", 1 << 28)
    defaults = LocalModelVLMServing_vllm().settings.serving
    assert (defaults.model, defaults.max_model_len, defaults.seed) == (
        "Qwen/Qwen2.5-VL-7B-Instruct", 51200, None)
    with pytest.raises(ConfigError, match="unknown serving option"):
        LocalModelVLMServing_vllm(vllm_swap_space=4)

    # The environment wins over the script, so an unedited script can run the test engine.
    monkeypatch.setenv("CAPTIONFLOW_SERVING__MODEL", "/tiny")
    monkeypatch.setenv("CAPTIONFLOW_SERVING__MAX_MODEL_LEN", "4096")
    pinned = LocalModelVLMServing_vllm(hf_model_name_or_path="Qwen/Qwen2.5-VL-7B-Instruct",
                                       vllm_max_model_len=51200, vllm_top_p=0.3)
    assert (pinned.settings.serving.model, pinned.settings.serving.max_model_len,
            pinned.settings.serving.top_p) == ("/tiny", 4096, 0.3)


def test_sync_run_inside_an_event_loop_says_to_await_arun(tmp_path: Path) -> None:
    serving = LocalModelVLMServing_vllm.from_backend(Echo(), Settings())
    storage = FileStorage(str(tmp_path / "none.json")).step()

    async def inside() -> None:
        VideoToCaptionGenerator(vlm_serving=serving).run(storage)

    with pytest.raises(InternalError, match="arun"):
        asyncio.run(inside())


def test_sync_operator_with_prompt_template(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_video(tmp_path / "a.mp4", seed=3)
    (tmp_path / "in.json").write_text(
        '[{"video": ["./a.mp4"], "conversation": [{"from": "human", "value": ""}]},'
        ' {"video": ["./a.mp4"], "conversation": [{"from": "human", "value": "Own"}]}]')
    serving = LocalModelVLMServing_vllm.from_backend(Echo(), Settings())
    storage = FileStorage("in.json", cache_path="c", file_name_prefix="p")
    report = VideoToCaptionGenerator(serving, prompt_template="Name the colours.").run(
        storage.step())
    serving.cleanup()
    assert report.captioned == 2
    out = read_rows(tmp_path / "c" / "p_step1.json")
    assert [r["conversation"][0]["value"] for r in out] == ["Name the colours.", "Own"]
    assert out[0]["caption"].endswith("Name the colours.")
