"""Serving pieces that need no engine: prompt, metadata, settings checks, the openai client's
retry and error mapping (against an in-process HTTP transport), the tiny model files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from captionflow.config import DEFAULT_PROMPT, ServingSettings
from captionflow.errors import (
    ConfigError,
    Dependency,
    DependencyState,
    EngineDeadError,
    EngineOverloadedError,
    EngineRequestFailedError,
    EngineUnavailableError,
    ErrorKind,
    InvalidRequestError,
    PromptTooLongError,
)
from captionflow.serving import (
    CaptionRequest,
    OpenAIBackend,
    TransformersBackend,
    VllmBackend,
    build_messages,
    check_engine_limits,
    make_backend,
    render_prompt,
    tiny_cpu_settings,
    video_metadata,
)
from captionflow.serving.vllm_engine import sampling_values
from tests.support.model_fixtures import synthetic_clip


def test_seed_defaults_kept():
    s = ServingSettings()
    assert (s.model, s.tensor_parallel_size, s.temperature, s.top_p, s.max_tokens,
            s.max_model_len, s.gpu_memory_utilization) == (
        "Qwen/Qwen2.5-VL-7B-Instruct", 1, 0.7, 0.9, 2048, 51200, 0.9)


def test_empty_prompt_becomes_default_and_video_comes_first():
    messages = build_messages("  ")
    assert messages[0] == {"role": "system", "content": "You are a helpful assistant."}
    assert messages[1]["content"] == [{"type": "video"}, {"type": "text", "text": DEFAULT_PROMPT}]
    assert build_messages("Count the cats.")[1]["content"][1]["text"] == "Count the cats."


def test_chat_template_renders_qwen_prompt(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert render_prompt(tok, build_messages("")) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|video_pad|><|vision_end|>Please describe the video in detail."
        "<|im_end|>\n<|im_start|>assistant\n")


def test_tiny_model_files(tiny_model_dir):
    assert tiny_model_dir.name == "qwen2.5-vl-tiny"
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["text_config"]["max_position_embeddings"] == 65536
    tok = json.loads((tiny_model_dir / "tokenizer.json").read_text())
    specials = {t["content"]: t["id"] for t in tok["added_tokens"]}
    assert specials["<|video_pad|>"] == config["video_token_id"]
    assert specials["<|vision_start|>"] == config["vision_start_token_id"]
    assert len(specials) == 14


@pytest.mark.parametrize("fps", [0.5, 2.0, 3.0])
def test_metadata_makes_sampled_fps_exact(fps):
    from transformers.video_utils import VideoMetadata

    clip = synthetic_clip(0, frames=6, fps=fps)
    meta = video_metadata(clip)
    assert meta["do_sample_frames"] is False
    vm = VideoMetadata(**{k: v for k, v in meta.items() if k != "do_sample_frames"})
    assert vm.sampled_fps == pytest.approx(fps)


def test_hf_processor_second_per_grid_ts(tiny_settings):
    backend = TransformersBackend(tiny_settings)
    from transformers import AutoProcessor

    backend._processor = AutoProcessor.from_pretrained(tiny_settings.model)
    inputs = backend.processor_inputs(CaptionRequest("r", synthetic_clip(1, fps=0.5), ""))
    assert inputs["second_per_grid_ts"].tolist() == [4.0]  # temporal_patch_size / fps


def test_sampling_overrides_and_unknown_keys():
    s = ServingSettings(temperature=0.2)
    values = sampling_values(s, {"seed": 7, "max_tokens": 5})
    assert values["temperature"] == 0.2 and values["seed"] == 7 and values["max_tokens"] == 5
    with pytest.raises(InvalidRequestError, match="unknown sampling option"):
        sampling_values(s, {"beam_width": 4})


def test_limits_explained_at_start_up(tiny_model_dir):
    with pytest.raises(ConfigError, match="max_position_embeddings=65536"):
        check_engine_limits(tiny_cpu_settings(tiny_model_dir, max_model_len=70000,
                                              max_num_batched_tokens=70000), cpu=True)
    with pytest.raises(ConfigError, match="share of all RAM"):
        check_engine_limits(ServingSettings(model=str(tiny_model_dir)), cpu=True,
                            available_bytes=1 << 30)
    with pytest.raises(ConfigError, match="cannot hold one sequence"):
        check_engine_limits(tiny_cpu_settings(tiny_model_dir, kv_cache_memory_bytes=1 << 20),
                            cpu=True)
    # The seed's max_model_len fits the tiny model, and GPU settings pass on a GPU.
    check_engine_limits(tiny_cpu_settings(tiny_model_dir, max_model_len=51200,
                                          max_num_batched_tokens=51200), cpu=True)
    check_engine_limits(ServingSettings(model=str(tiny_model_dir)), cpu=False)


def test_factory_picks_backend():
    assert isinstance(make_backend(ServingSettings(backend="vllm")), VllmBackend)
    assert isinstance(make_backend(ServingSettings(backend="openai")), OpenAIBackend)
    assert isinstance(make_backend(ServingSettings(backend="transformers")), TransformersBackend)


# --- openai client against an in-process HTTP transport ---------------------------------

def _ok(request_id_seen: list[str]):
    def handler(request: httpx.Request) -> httpx.Response:
        request_id_seen.append(request.headers["x-request-id"])
        return httpx.Response(200, json={
            "choices": [{"message": {"content": "a cat"}, "finish_reason": "stop",
                         "token_ids": [5, 6, 2]}],
            "prompt_token_ids": [1, 2, 3], "usage": {"prompt_tokens": 3, "completion_tokens": 3}})
    return handler


def _backend(handler, **kw) -> OpenAIBackend:
    settings = ServingSettings(backend="openai", model="m", openai_retry_backoff_ms=1, **kw)
    return OpenAIBackend(settings, transport=httpx.MockTransport(handler))


async def test_openai_retries_5xx_and_429_then_succeeds():
    seen: list[str] = []
    answers = iter([httpx.Response(503, text="busy"),
                    httpx.Response(429, json={"error": {"message": "slow down"}})])

    def handler(request):
        return next(answers, None) or _ok(seen)(request)

    async with _backend(handler, openai_max_retries=2) as backend:
        result = await backend.caption(CaptionRequest("ev-1", synthetic_clip(0), ""))
    assert result.request_id == "ev-1" and result.token_ids == (5, 6, 2)
    assert result.prompt_token_ids == (1, 2, 3) and seen == ["ev-1"]


async def test_openai_body_sends_exact_frames_and_fps():
    bodies = []

    def handler(request):
        bodies.append(json.loads(request.content))
        return _ok([])(request)

    async with _backend(handler, seed=3) as backend:
        await backend.caption(CaptionRequest("ev-2", synthetic_clip(0, frames=6, fps=1.5), ""))
    body = bodies[0]
    video = body["messages"][1]["content"][0]
    assert video["type"] == "video_url"
    assert video["video_url"]["url"].startswith("data:video/jpeg;base64,")
    assert video["video_url"]["url"].count(",") == 6
    assert body["media_io_kwargs"] == {"video": {"num_frames": 6, "fps": 1.5}}
    assert body["seed"] == 3 and body["return_token_ids"] is True


@pytest.mark.parametrize(("status", "message", "error"), [
    (400, "The decoder prompt (length 9000) is longer than the maximum model length of 4096.",
     PromptTooLongError),
    (400, "top_p must be in (0, 1]", InvalidRequestError),
    (404, "The model `x` does not exist.", EngineDeadError),
    (401, "invalid api key", EngineUnavailableError),
    (429, "overloaded", EngineOverloadedError),
    (500, "boom", EngineUnavailableError),
    (501, "nope", EngineRequestFailedError),
])
async def test_openai_errors_are_typed(status, message, error):
    calls = []

    def handler(request):
        calls.append(1)
        return httpx.Response(status, json={"error": {"message": message}})

    async with _backend(handler, openai_max_retries=2) as backend:
        with pytest.raises(error, match="ev-3"):
            await backend.caption(CaptionRequest("ev-3", synthetic_clip(0), ""))
    assert len(calls) == (3 if status in (429, 500) else 1)
    expected_kind = (ErrorKind.DEPENDENCY if status in (401, 429, 500) else
                     ErrorKind.FATAL if status == 404 else ErrorKind.EVENT)
    assert error(message).kind == expected_kind


async def test_openai_refusals_and_overload_say_so_and_retry_after_is_left_to_the_worker():
    calls = []

    def handler(request):
        calls.append(request.url.path)
        if request.url.path.endswith("/models"):
            return httpx.Response(401, json={"error": {"message": "bad key"}})
        return httpx.Response(429, headers={"Retry-After": "1"},
                              json={"error": {"message": "busy"}})

    async with _backend(handler, openai_max_retries=2) as backend:
        with pytest.raises(EngineOverloadedError) as info:
            await backend.caption(CaptionRequest("ev-7", synthetic_clip(0), ""))
        assert await backend.health_state() is DependencyState.MISCONFIGURED
    # Not slept on inside the client: the worker pauses for the Retry-After instead.
    assert calls.count("/v1/chat/completions") == 1
    assert info.value.state is DependencyState.OVERLOADED and info.value.retry_after_s == 1


async def test_openai_unreachable_server_is_a_dependency_error_not_the_events():
    def handler(request):
        raise httpx.ConnectError("connection refused")

    async with _backend(handler, openai_max_retries=1) as backend:
        with pytest.raises(EngineUnavailableError, match="openai_base_url") as info:
            await backend.caption(CaptionRequest("ev-4", synthetic_clip(0), ""))
    assert info.value.retriable and info.value.kind == ErrorKind.DEPENDENCY
    assert info.value.dependency == Dependency.ENGINE


async def test_openai_retry_after_is_capped():
    calls = []

    def handler(request):
        calls.append(1)
        return httpx.Response(429, headers={"Retry-After": "86400"},
                              json={"error": {"message": "busy"}})

    async with _backend(handler, openai_max_retries=0, retry_after_max_s=2.5) as backend:
        with pytest.raises(EngineOverloadedError) as info:
            await backend.caption(CaptionRequest("ev-6", synthetic_clip(0), ""))
    assert info.value.retry_after_s == 2.5


def test_there_is_no_url_transport():
    # A server fetching references itself would bypass the worker's fetch guards.
    from captionflow.config import Settings
    from captionflow.errors import ConfigError

    with pytest.raises(ConfigError, match="openai_video_transport"):
        Settings.load(overrides={"serving.openai_video_transport": "url"})
    assert Settings.load(overrides={"serving.openai_video_transport": "frames"})


async def test_openai_server_without_trusted_mm_kwargs_is_a_fatal_config_error():
    # vLLM 0.32's answer when the server runs without --trust-request-mm-kwargs.
    message = ("Per-request media_io_kwargs are disabled by default because they can change "
               "multimodal media loading resource usage. Start the server with "
               "--trust-request-mm-kwargs only when clients are trusted.")

    def handler(request):
        return httpx.Response(400, json={"error": {"message": message,
                                                   "param": "media_io_kwargs"}})

    async with _backend(handler) as backend:
        with pytest.raises(EngineDeadError, match="openai_video_transport") as info:
            await backend.caption(CaptionRequest("ev-6", synthetic_clip(0), ""))
    assert "--trust-request-mm-kwargs" in str(info.value)


def test_vllm_server_command_has_the_engine_settings(tiny_model_dir):
    from captionflow.serving.engine_setup import vllm_server_command

    cmd = vllm_server_command(tiny_cpu_settings(tiny_model_dir), port=8123)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    flags = dict(zip(cmd[3::1], cmd[4::1], strict=False))
    assert flags["--model"] == str(tiny_model_dir) and flags["--port"] == "8123"
    assert flags["--dtype"] == "float32" and flags["--max-model-len"] == "4096"
    assert flags["--max-num-batched-tokens"] == "4096" and flags["--max-num-seqs"] == "8"
    assert flags["--kv-cache-memory-bytes"] == str(256 << 20)
    assert json.loads(flags["--limit-mm-per-prompt"]) == {"image": 0, "video": 1}
    assert "--enforce-eager" in cmd and "--trust-request-mm-kwargs" in cmd
    assert "--gpu-memory-utilization" not in cmd


def test_vllms_cache_stays_its_own_unless_a_work_dir_is_given(tmp_path, monkeypatch) -> None:
    """Sockets and temp files go to a fresh directory; vLLM's cache (its model inspection,
    ~11 s per cold engine start) stays where vLLM keeps it, unless serving.work_dir says."""
    from captionflow.serving.engine_setup import prepare_vllm_environment

    for name in ("VLLM_CACHE_ROOT", "VLLM_RPC_BASE_PATH", "TMPDIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # mkdtemp reads it, not TMPDIR
    prepare_vllm_environment()
    assert "VLLM_CACHE_ROOT" not in os.environ
    rpc, tmp = Path(os.environ["VLLM_RPC_BASE_PATH"]), Path(os.environ["TMPDIR"])
    assert rpc.is_dir() and tmp.is_dir()

    for name in ("VLLM_RPC_BASE_PATH", "TMPDIR"):
        monkeypatch.delenv(name)
    prepare_vllm_environment(tmp_path / "work")
    assert os.environ["VLLM_CACHE_ROOT"] == str(tmp_path / "work" / "cache")
    assert os.environ["TMPDIR"] == str(tmp_path / "work" / "tmp")
