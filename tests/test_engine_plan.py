"""A first run without settings, checked without an engine: what the engine plan fills in
(and keeps), the largest-video bound against the model's real processor, settings that
cannot work refused once before any row is written, the user's own files in batch mode, and
CSV/parquet row files through FileStorage steps."""

from __future__ import annotations

import asyncio
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from captionflow.batch import FileStorage, read_rows, run_file, write_rows
from captionflow.config import ServingSettings, Settings, VideoSettings
from captionflow.dataflow import LocalModelVLMServing_vllm, VideoToCaptionGenerator
from captionflow.errors import ConfigError, EngineDeadError, VideoForbiddenError
from captionflow.serving.engine_plan import (
    KV_MAX_SEQUENCES,
    PROMPT_TEXT_TOKENS,
    VLLM_DEFAULT_BATCHED_TOKENS,
    VisionGeometry,
    check_engine_limits,
    clip_tokens,
    cpu_dtype,
    cpu_has_native_bf16,
    kv_bytes_per_token,
    largest_video_tokens,
    plan_engine,
    vision_geometry,
)
from captionflow.video.fetch import fetch
from captionflow.video.sampling import SamplingPolicy
from tests.support.worker_fixtures import make_video
from tests.test_batch_files import Echo

GIB = 1 << 30


@pytest.fixture
def no_captionflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in __import__("os").environ if k.startswith("CAPTIONFLOW_")]:
        monkeypatch.delenv(key)


def test_cpu_plan_fills_every_unset_engine_field(tiny_model_dir_8k: Path,
                                                 no_captionflow_env: None) -> None:
    settings = Settings.load(overrides={"serving.model": str(tiny_model_dir_8k)})
    plan = plan_engine(settings.serving, settings.video, cpu=True, available_bytes=8 * GIB)
    s = plan.settings
    assert s.max_model_len == 8192  # the seed's 51200, clamped to the model's own limit
    assert (s.dtype, s.enforce_eager) == ("float32", True)
    one_sequence = kv_bytes_per_token(s.model, "float32") * 8192
    assert one_sequence <= s.kv_cache_memory_bytes <= 2 * GIB
    # The largest video of the default sampling is longer than the context: the budget holds
    # a whole context, so any video that fits the model also fits the encoder cache.
    assert s.max_num_batched_tokens == 8192
    assert set(plan.chosen) == {"max_model_len", "dtype", "enforce_eager",
                                "kv_cache_memory_bytes", "max_num_batched_tokens",
                                "max_num_seqs"}
    assert s.max_num_seqs == KV_MAX_SEQUENCES  # the KV cache holds no more at full length
    assert "max_model_len=8192" in plan.describe() and "as given none" in plan.describe()
    check_engine_limits(s, cpu=True, video=settings.video, available_bytes=8 * GIB)


def test_a_batch_job_sizes_the_engine_from_its_rows(tiny_model_dir: Path,
                                                    no_captionflow_env: None) -> None:
    """Not 8 sequences of the seed's 51200 tokens: the context its longest request can
    need, and KV for its rows at the size of the one it decoded first, never below one
    whole context."""
    settings = Settings.load(overrides={"serving.model": str(tiny_model_dir),
                                        "serving.max_tokens": 64})
    service = plan_engine(settings.serving, settings.video, cpu=True, available_bytes=8 * GIB)
    per_token = kv_bytes_per_token(str(tiny_model_dir), "float32")
    geometry = vision_geometry(str(tiny_model_dir))
    sample = clip_tokens(20, 364, 644, geometry)  # a 10 s 640x360 clip at 2 fps
    assert 0 < sample < 10_000
    job = plan_engine(settings.serving, settings.video, cpu=True, available_bytes=8 * GIB,
                      requests=20, sample_tokens=sample)
    s = job.settings
    bound = largest_video_tokens(settings.video, geometry) + PROMPT_TEXT_TOKENS + 64
    assert bound <= s.max_model_len < bound + 128 and s.max_model_len < 51200
    assert s.max_num_seqs == KV_MAX_SEQUENCES
    # Eight rows of the sampled size fit in less than one whole context here, so the cache
    # holds one whole context (vLLM refuses less), a fraction of the service's.
    assert s.kv_cache_memory_bytes == per_token * (s.max_model_len + 128)
    assert s.kv_cache_memory_bytes < service.settings.kv_cache_memory_bytes / 4
    check_engine_limits(s, cpu=True, video=settings.video, available_bytes=8 * GIB)
    # Three rows: three sequences at most.
    few = plan_engine(settings.serving, settings.video, cpu=True, available_bytes=8 * GIB,
                      requests=3)
    assert few.settings.max_num_seqs == 3
    assert few.settings.kv_cache_memory_bytes == 3 * per_token * (few.settings.max_model_len
                                                                  + 128)
    # What the user set stays.
    given = settings.serving.model_copy(update={"max_model_len": 4096, "max_num_seqs": 2})
    kept = plan_engine(given, settings.video, cpu=True, available_bytes=8 * GIB, requests=20,
                       sample_tokens=sample).settings
    assert (kept.max_model_len, kept.max_num_seqs) == (4096, 2)


def test_cpu_dtype_follows_the_checkpoint_and_the_cpu(tiny_model_dir: Path,
                                                     tmp_path: Path) -> None:
    assert cpu_dtype(str(tiny_model_dir)) == "float32"  # never downcast a float32 model
    model = tmp_path / "qwen2.5-vl-tiny"
    shutil.copytree(tiny_model_dir, model)
    config = orjson.loads((model / "config.json").read_bytes())
    config["torch_dtype"] = config["text_config"]["torch_dtype"] = "bfloat16"
    (model / "config.json").write_bytes(orjson.dumps(config))
    assert cpu_dtype(str(model)) == ("bfloat16" if cpu_has_native_bf16() else "float32")


def test_gpu_keeps_the_seed_defaults_and_only_sizes_the_token_budget(
        tiny_model_dir: Path, no_captionflow_env: None) -> None:
    settings = Settings.load(overrides={"serving.model": str(tiny_model_dir)})
    plan = plan_engine(settings.serving, settings.video, cpu=False)
    s = plan.settings
    assert (s.dtype, s.gpu_memory_utilization, s.max_model_len, s.enforce_eager,
            s.kv_cache_memory_bytes) == ("auto", 0.9, 51200, False, None)
    assert set(plan.chosen) == {"max_num_batched_tokens"}
    geometry = vision_geometry(str(tiny_model_dir))
    assert s.max_num_batched_tokens == largest_video_tokens(settings.video, geometry) > 2048
    # Small budgets need no more than vLLM's own default: nothing is chosen then.
    small = VideoSettings(max_frames=8, max_pixels=64 * 28 * 28, min_pixels=16 * 28 * 28)
    assert plan_engine(settings.serving, small, cpu=False).chosen == {}


def test_explicit_settings_are_kept(tiny_model_dir: Path, no_captionflow_env: None,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTIONFLOW_SERVING__DTYPE", "bfloat16")
    monkeypatch.setenv("CAPTIONFLOW_SERVING__MAX_MODEL_LEN", "4096")
    monkeypatch.setenv("CAPTIONFLOW_SERVING__KV_CACHE_MEMORY_BYTES", str(64 << 20))
    settings = Settings.load(overrides={"serving.model": str(tiny_model_dir)})
    plan = plan_engine(settings.serving, settings.video, cpu=True, available_bytes=8 * GIB)
    assert (plan.settings.dtype, plan.settings.max_model_len,
            plan.settings.kv_cache_memory_bytes) == ("bfloat16", 4096, 64 << 20)
    assert set(plan.chosen) == {"enforce_eager", "max_num_batched_tokens", "max_num_seqs"}
    assert plan.given == {"max_model_len": 4096, "dtype": "bfloat16",
                          "kv_cache_memory_bytes": 64 << 20}


def test_explicit_settings_that_cannot_work_fail_with_the_fix(tiny_model_dir: Path,
                                                              tmp_path: Path) -> None:
    model = str(tiny_model_dir)
    with pytest.raises(ConfigError, match="not a model directory"):
        check_engine_limits(ServingSettings(model=str(tmp_path / "no-such-model")), cpu=True)
    with pytest.raises(ConfigError, match="max_position_embeddings=65536"):
        check_engine_limits(ServingSettings(model=model, max_model_len=70000), cpu=False)
    video = VideoSettings()
    needed = largest_video_tokens(video, vision_geometry(model))
    with pytest.raises(ConfigError, match=f"set it to {needed} or more"):
        check_engine_limits(ServingSettings(model=model, max_num_batched_tokens=1024),
                            cpu=False, video=video)
    # Below max_model_len is fine as long as the largest video fits (chunked prefill).
    check_engine_limits(ServingSettings(model=model, max_num_batched_tokens=needed),
                        cpu=False, video=video)
    with pytest.raises(ConfigError, match="share of all RAM"):
        check_engine_limits(ServingSettings(model=model, gpu_memory_utilization=0.9),
                            cpu=True, available_bytes=GIB // 2)
    with pytest.raises(ConfigError, match="more than the"):
        check_engine_limits(ServingSettings(model=model, kv_cache_memory_bytes=4 * GIB),
                            cpu=True, available_bytes=GIB)


def test_little_free_memory_shortens_an_unset_context(tiny_model_dir: Path) -> None:
    per_token = kv_bytes_per_token(str(tiny_model_dir), "float32")
    free = 4 * per_token * 8192  # a quarter of it holds one 8192-token sequence
    plan = plan_engine(ServingSettings(model=str(tiny_model_dir)), cpu=True,
                       available_bytes=free)
    assert 1024 <= plan.settings.max_model_len < 8192
    check_engine_limits(plan.settings, cpu=True, available_bytes=free)


def _processor_tokens(height: int, width: int, frames: int, geometry: VisionGeometry) -> int:
    """Tokens the model's processor makes of frames of this size (transformers' own resize)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    h, w = smart_resize(height, width, factor=geometry.unit,
                        min_pixels=geometry.min_pixels or 1,
                        max_pixels=geometry.max_pixels or 1 << 40)
    patches = (h // geometry.patch_size) * (w // geometry.patch_size)
    return math.ceil(frames / geometry.temporal_patch_size) * patches // geometry.merge_size ** 2


@pytest.mark.parametrize("processor_max", [None, 256 * 28 * 28, 224 * 224])
@pytest.mark.parametrize("video", [
    VideoSettings(),
    VideoSettings(max_frames=32, max_pixels=256 * 28 * 28, total_pixels=4096 * 28 * 28),
    VideoSettings(max_frames=4, min_pixels=28 * 28 * 4, max_pixels=112 * 84),
], ids=["defaults", "mid", "tests"])
def test_no_sampled_video_has_more_tokens_than_the_bound(video: VideoSettings,
                                                         processor_max: int | None) -> None:
    geometry = VisionGeometry(min_pixels=56 * 56 if processor_max else None,
                              max_pixels=processor_max)
    bound = largest_video_tokens(video, geometry)
    # Ordinary sizes, a tiny one (scaled up) and very wide ones (sides clamped to 28).
    sources = [(360, 640), (1080, 1920), (60, 100), (2160, 3840), (8, 1400), (29, 3580),
               (16, 2800), (150, 27000), (1700, 10)]
    policy = SamplingPolicy.from_settings(video)
    worst = 0
    for frames in range(2, video.max_frames + 1, 2):
        for src_h, src_w in sources:
            h, w = policy.frame_size(src_h, src_w, frames)
            worst = max(worst, _processor_tokens(h, w, frames, geometry))
    assert 0 < worst <= bound


def test_very_wide_frames_stay_within_the_models_aspect_limit() -> None:
    """Flooring the short side to 28 used to leave a 180:1 source at 297:1, which the
    model's processor refuses ("absolute aspect ratio must be smaller than 200")."""
    policy = SamplingPolicy.from_settings(VideoSettings())
    for frames in (2, 100, 768):
        h, w = policy.frame_size(150, 27000, frames)
        assert w / h <= 200 and h % 28 == 0 and w % 28 == 0


def test_the_issue_clips_fit_the_planned_encoder_cache(tiny_model_dir_8k: Path,
                                                       tmp_path: Path) -> None:
    """20 frames of 640x360 under a processor that keeps 200704 pixels a frame make 2520
    tokens, above vLLM's default 2048: the plan's budget holds them."""
    from transformers import AutoProcessor

    model = tmp_path / "qwen2.5-vl-tiny"
    shutil.copytree(tiny_model_dir_8k, model)
    config = orjson.loads((model / "processor_config.json").read_bytes())
    config["video_processor"]["size"]["longest_edge"] = 256 * 28 * 28
    (model / "processor_config.json").write_bytes(orjson.dumps(config))
    h, w = SamplingPolicy.from_settings(VideoSettings()).frame_size(360, 640, 20)
    frames = np.zeros((20, h, w, 3), np.uint8)
    out = AutoProcessor.from_pretrained(model).video_processor(
        videos=[frames], return_tensors="np", do_sample_frames=False)
    tokens = int(np.prod(out["video_grid_thw"][0])) // 4
    assert tokens == 2520 > VLLM_DEFAULT_BATCHED_TOKENS
    for cpu in (True, False):
        plan = plan_engine(ServingSettings(model=str(model)), VideoSettings(), cpu=cpu,
                           available_bytes=8 * GIB)
        assert plan.settings.max_num_batched_tokens >= tokens


def test_seed_parameter_values_count_as_unset(tiny_model_dir_8k: Path,
                                              no_captionflow_env: None,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTIONFLOW_SERVING__MODEL", str(tiny_model_dir_8k))
    serving = LocalModelVLMServing_vllm(
        hf_model_name_or_path="Qwen/Qwen2.5-VL-7B-Instruct", hf_cache_dir="./dataflow_cache",
        vllm_tensor_parallel_size=1, vllm_temperature=0.7, vllm_top_p=0.9,
        vllm_max_tokens=2048, vllm_max_model_len=51200,
        vllm_gpu_memory_utilization=0.9).settings.serving
    assert {"max_model_len", "gpu_memory_utilization", "dtype"}.isdisjoint(
        serving.model_fields_set)
    plan = plan_engine(serving, cpu=True, available_bytes=8 * GIB)
    assert (plan.settings.max_model_len, plan.settings.dtype) == (8192, "float32")
    assert plan.settings.kv_cache_memory_bytes is not None
    # A value of the script's own stays the script's: refused when it cannot work.
    own = LocalModelVLMServing_vllm(vllm_max_model_len=16384).settings.serving
    assert "max_model_len" in own.model_fields_set
    with pytest.raises(ConfigError, match="max_position_embeddings=8192"):
        check_engine_limits(plan_engine(own, cpu=True, available_bytes=8 * GIB).settings,
                            cpu=True, available_bytes=8 * GIB)


class FailingStart(Echo):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error
        self.starts = 0

    async def start(self) -> None:
        self.starts += 1
        await asyncio.sleep(0.05)  # other rows reach the model meanwhile
        raise self.error


@pytest.mark.parametrize("error, raised", [
    (ConfigError("serving.model 'x' is not a model directory"), ConfigError),
    (RuntimeError("no engine for you"), EngineDeadError),
])
def test_a_start_up_error_ends_the_run_once_and_writes_no_row(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception,
        raised: type[Exception]) -> None:
    monkeypatch.chdir(tmp_path)
    rows = [{"video": ["missing.mp4"]}]
    for n in range(5):
        make_video(tmp_path / f"v{n}.mp4", seed=n)
        rows.append({"video": [f"v{n}.mp4"]})
    (tmp_path / "rows.json").write_bytes(orjson.dumps(rows))
    out = tmp_path / "out.json"
    out.write_bytes(b'[{"an": "earlier output"}]\n')
    backend = FailingStart(error)
    with pytest.raises(raised) as info:
        asyncio.run(run_file("rows.json", out, cache_type="json", settings=Settings(),
                             backend=backend, concurrency=4, checkpoint_interval_s=0.0))
    assert backend.starts == 1 and backend.calls == 0
    assert getattr(error, "message", str(error)) in info.value.message
    assert out.read_bytes() == b'[{"an": "earlier output"}]\n'
    # The Python API raises the same error once, and leaves its step file alone too.
    storage = FileStorage("rows.json", cache_path="cache", file_name_prefix="p")
    api = LocalModelVLMServing_vllm.from_backend(FailingStart(error), Settings())
    try:
        with pytest.raises(raised):
            VideoToCaptionGenerator(vlm_serving=api).run(storage.step())
    finally:
        api.cleanup()
    assert not (tmp_path / "cache" / "p_step1.json").exists()


def test_batch_reads_the_users_files_anywhere_the_worker_only_under_its_roots(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    clip = make_video(elsewhere / "clip.mp4", seed=4)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    batch = VideoSettings(any_local_path=True)
    assert fetch(str(clip), batch).path == clip.resolve()
    assert fetch("../elsewhere/clip.mp4", batch).path == clip.resolve()
    assert fetch(f"file://{clip}", batch).path == clip.resolve()
    for worker in (VideoSettings(), VideoSettings(allowed_roots=(work,), any_local_path=True)):
        with pytest.raises(VideoForbiddenError):
            fetch(str(clip), worker)


@pytest.mark.parametrize("cache_type", ["csv", "parquet"])
def test_csv_and_parquet_round_trip_through_file_storage_steps(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache_type: str) -> None:
    monkeypatch.chdir(tmp_path)
    make_video(tmp_path / "a.mp4", seed=1)
    rows: list[dict[str, Any]] = [
        {"id": "001", "video": ["./a.mp4"], "conversation": [{"from": "human", "value": ""}],
         "meta": {"source": "cam-1", "tags": ["x", "y"], "fps": 2.5}},
        {"video": "./a.mp4", "score": 3, "note": "[not json", "empty": ""},
        {"video": ["./missing.mp4"], "meta": {"other": None}},
    ]
    first = write_rows(tmp_path / f"rows.{cache_type}", rows, cache_type)  # type: ignore[arg-type]
    assert read_rows(first) == rows
    storage = FileStorage(str(first), cache_path="cache", file_name_prefix="cap",
                          cache_type=cache_type)
    serving = LocalModelVLMServing_vllm.from_backend(Echo(), Settings())
    try:
        report = VideoToCaptionGenerator(vlm_serving=serving).run(storage.step())
    finally:
        serving.cleanup()
    assert (report.captioned, dict(report.failed)) == (2, {"video_not_found": 1})
    step2 = storage.step()
    assert step2.read_path == Path("cache") / f"cap_step1.{cache_type}"
    out = step2.read()
    for row, got in zip(rows, out, strict=True):
        assert {k: got[k] for k in row if k != "conversation"} == \
            {k: v for k, v in row.items() if k != "conversation"}
    assert out[0]["conversation"] == [{"from": "human",
                                       "value": "Please describe the video in detail."}]
    assert isinstance(out[1]["caption"], str) and "error" not in out[1]
    assert out[2]["caption"] is None and out[2]["error"]["code"] == "video_not_found"
    step2.write(out)
    assert storage.step().read() == out
