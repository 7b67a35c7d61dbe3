"""The vLLM engine settings captionflow fills in for what the user left unset.

An explicit setting (config file, ``CAPTIONFLOW_SERVING__*``, a CLI flag, a keyword to the
DataFlow API that differs from the seed's default) is kept as given, and
:func:`check_engine_limits` refuses it at start-up when it cannot work. What is left unset:

- everywhere: ``max_model_len`` is clamped to the model's own limit, and the token budget
  (``max_num_batched_tokens``) raised until the largest video the sampling budgets
  (``video.max_frames``, ``max_pixels``, ``total_pixels``, ``min_pixels``) allow fits.
  vLLM 0.32 sizes its encoder cache as ``max(max_num_batched_tokens, its estimate)`` and
  refuses a bigger video ("exceeds the pre-allocated encoder cache size"); its estimate
  (the processor's image bounds, at most 14 frames) is below a real clip of captionflow's.
- with no GPU: a dtype the CPU runs (:func:`cpu_dtype`), eager mode (torch.compile on a
  CPU costs minutes at start-up), and the KV cache in bytes sized from free memory (the CPU
  backend reads ``gpu_memory_utilization`` as a share of all RAM and refuses to start when
  that much is not free), for :data:`KV_MAX_SEQUENCES` sequences at most, and
  ``max_num_seqs`` that many (vLLM's CPU default, 128 or more, admits every row of a batch
  at once, each holding its frames in both engine processes).
- for a batch job (``requests`` known): the context its longest request can need (largest
  video, :data:`PROMPT_TEXT_TOKENS` of text, ``max_tokens``), not the seed's 51200, and KV
  for its rows (up to that bound) at the size of its first decoded request
  (``sample_tokens``), never below one whole context, so a longer row still runs.

On a GPU the seed's own values (dtype auto, gpu_memory_utilization 0.9, ...) stay as they are.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captionflow.config import ServingSettings, VideoSettings
from captionflow.errors import ConfigError

log = logging.getLogger(__name__)

# vLLM's token budget when none is given (SchedulerConfig.DEFAULT_MAX_NUM_BATCHED_TOKENS).
VLLM_DEFAULT_BATCHED_TOKENS = 2048
# Free memory the automatic KV cache may take: the rest is for weights, activations, the
# decoded frames and everything else on the machine.
KV_FREE_MEMORY_SHARE = 0.25
# A CPU engine runs a handful of sequences at once; KV for more full-length sequences than
# this would sit idle.
KV_MAX_SEQUENCES = 8
PROMPT_TEXT_TOKENS = 1024  # room for the chat template and the prompts in a job's context
KV_MAX_BYTES = 16 << 30
# vLLM stores KV in blocks; a sequence may need up to one block more than its tokens.
_KV_BLOCK_TOKENS = 128
_MIN_MODEL_LEN = 1024
_FRAME_FACTOR = 2
_MAX_ASPECT_RATIO = 200


@dataclass(frozen=True, slots=True)
class VisionGeometry:
    """How the model turns frames into tokens: one token per ``merge_size``² patches of
    ``patch_size``² pixels, per ``temporal_patch_size`` frames. ``min_pixels`` and
    ``max_pixels`` are the processor's own per-frame bounds (None: it does not resize)."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int | None = None
    max_pixels: int | None = None

    @property
    def unit(self) -> int:
        return self.patch_size * self.merge_size


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _pixel_bounds(config: dict[str, Any]) -> tuple[int | None, int | None]:
    size = config.get("size") if isinstance(config.get("size"), dict) else {}
    low = config.get("min_pixels", size.get("shortest_edge"))
    high = config.get("max_pixels", size.get("longest_edge"))
    return (int(low) if low else None), (int(high) if high else None)


def vision_geometry(model: str, mm_processor_kwargs: dict[str, Any] | None = None
                    ) -> VisionGeometry:
    """The geometry of a local Qwen-VL checkpoint (its ``config.json`` and video processor
    config); Qwen2.5-VL's values, with no processor resize, when the model is not local."""
    root = Path(model)
    config = _read_json(root / "config.json")
    vision = config.get("vision_config") or {}
    processor: dict[str, Any] = {}
    for name in ("processor_config.json", "video_preprocessor_config.json",
                 "preprocessor_config.json"):
        data = _read_json(root / name)
        data = data.get("video_processor", data) if name == "processor_config.json" else data
        if data:
            processor = data
            break
    low, high = _pixel_bounds(processor)
    if processor.get("do_resize") is False:
        low = high = None
    override_low, override_high = _pixel_bounds(dict(mm_processor_kwargs or {}))
    return VisionGeometry(
        patch_size=int(vision.get("patch_size") or processor.get("patch_size") or 14),
        merge_size=int(vision.get("spatial_merge_size") or processor.get("merge_size") or 2),
        temporal_patch_size=int(vision.get("temporal_patch_size")
                                or processor.get("temporal_patch_size") or 2),
        min_pixels=override_low or low, max_pixels=override_high or high)


def _down_ceiling(pixels: float, unit: int) -> float:
    """The most pixels a resize *down* to ``pixels`` can give (smart_resize rounds both sides
    down, but never below ``unit``), over every aspect ratio the model accepts: a side that
    would fall below ``unit`` is raised to it, so a very wide frame can exceed ``pixels``."""
    return max(pixels, unit * math.sqrt(pixels * _MAX_ASPECT_RATIO))


def _up_ceiling(pixels: float, unit: int) -> float:
    """The most pixels a resize *up* to ``pixels`` can give (both sides rounded up to
    multiples of ``unit``), over every aspect ratio the model accepts."""
    spread = math.sqrt(_MAX_ASPECT_RATIO) + 1 / math.sqrt(_MAX_ASPECT_RATIO)
    return pixels + unit * math.sqrt(pixels) * spread + unit * unit


def largest_video_tokens(video: VideoSettings, geometry: VisionGeometry) -> int:
    """An upper bound on the tokens of one video that the sampling settings allow: frames
    are resized by captionflow (qwen-vl-utils rules, within ``max_pixels`` and the
    ``total_pixels`` budget, never below ``min_pixels``) and again by the model's processor
    (within its own bounds), then cut into patches."""
    unit = geometry.unit
    largest = 0
    for frames in range(_FRAME_FACTOR, video.max_frames - video.max_frames % 2 + 1,
                        _FRAME_FACTOR):
        budget = max(min(video.max_pixels, video.total_pixels / frames * _FRAME_FACTOR),
                     int(video.min_pixels * 1.05))
        pixels = max(_down_ceiling(budget, 28), _up_ceiling(video.min_pixels, 28))
        # The processor leaves a frame within its bounds as it is, scales a bigger one
        # down and a smaller one up.
        if geometry.max_pixels is not None:
            pixels = min(pixels, _down_ceiling(geometry.max_pixels, unit))
        if geometry.min_pixels is not None:
            pixels = max(pixels, _up_ceiling(geometry.min_pixels, unit))
        steps = math.ceil(frames / geometry.temporal_patch_size)
        largest = max(largest, steps * int(pixels // (unit * unit)))
    return largest


def clip_tokens(frames: int, height: int, width: int, geometry: VisionGeometry) -> int:
    """The tokens of a clip of ``frames`` frames of ``height`` x ``width`` once the model's
    processor has resized it within its bounds (to the nearest multiple of the unit)."""
    unit = geometry.unit
    pixels = float(round(height / unit) * unit * round(width / unit) * unit)
    if geometry.max_pixels is not None:
        pixels = min(pixels, _down_ceiling(geometry.max_pixels, unit))
    if geometry.min_pixels is not None:
        pixels = max(pixels, _up_ceiling(geometry.min_pixels, unit))
    return math.ceil(frames / geometry.temporal_patch_size) * int(pixels // (unit * unit))


def model_max_positions(model: str) -> int | None:
    """The model's own context limit from a local ``config.json``; None when the model is
    not a local folder (vLLM checks a hub model itself)."""
    config = _read_json(Path(model) / "config.json")
    text = config.get("text_config") or {}
    value = text.get("max_position_embeddings") or config.get("max_position_embeddings")
    return int(value) if value else None


def checkpoint_dtype(model: str) -> str | None:
    config = _read_json(Path(model) / "config.json")
    text = config.get("text_config") or {}
    value = config.get("torch_dtype") or config.get("dtype") or text.get("torch_dtype") \
        or text.get("dtype")
    return str(value) if value else None


def cpu_has_native_bf16() -> bool:
    try:
        import torch
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (ImportError, AttributeError):
        return False


def cpu_dtype(model: str) -> str:
    """float32 for a float32 checkpoint (vLLM's ``auto`` would downcast it to bfloat16 on a
    CPU, and then its greedy tokens no longer equal transformers'); bfloat16 for a 16-bit
    checkpoint when the CPU computes bfloat16 natively (AVX512-BF16 or AMX: half the memory
    of float32 at full speed); float32 otherwise, the one dtype every CPU kernel runs at
    full speed (float16 and emulated bfloat16 are slow on x86)."""
    given = checkpoint_dtype(model)
    if given in ("bfloat16", "float16") and cpu_has_native_bf16():
        return "bfloat16"
    return "float32"


def kv_bytes_per_token(model: str, dtype: str) -> int:
    """K and V bytes of one token over all layers; 0 when the model is not local."""
    config = _read_json(Path(model) / "config.json")
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


def kv_sequence_bytes(per_token: int, tokens: int) -> int:
    """KV bytes that one sequence of ``tokens`` needs, with a block of slack."""
    return per_token * (tokens + _KV_BLOCK_TOKENS)


def available_memory_bytes() -> int:
    """Memory the OS can give without swapping (MemAvailable)."""
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def encoder_tokens_needed(settings: ServingSettings, video: VideoSettings) -> int:
    """Tokens the encoder cache and token budget must hold: the largest video, unless it is
    longer than the whole context (such a video fails as prompt_too_long anyway)."""
    geometry = vision_geometry(settings.model, settings.mm_processor_kwargs)
    return min(largest_video_tokens(video, geometry), settings.max_model_len)


@dataclass(frozen=True, slots=True)
class EnginePlan:
    settings: ServingSettings
    chosen: dict[str, Any]
    given: dict[str, Any]

    def describe(self) -> str:
        def show(values: dict[str, Any]) -> str:
            return ", ".join(f"{k}={v}" for k, v in values.items()) or "none"
        return f"chosen {show(self.chosen)}; as given {show(self.given)}"


_PLANNED = ("max_model_len", "max_num_batched_tokens", "dtype", "enforce_eager",
            "kv_cache_memory_bytes", "gpu_memory_utilization", "max_num_seqs")


def plan_engine(settings: ServingSettings, video: VideoSettings | None = None, *,
                cpu: bool, available_bytes: int | None = None,
                requests: int | None = None, sample_tokens: int | None = None) -> EnginePlan:
    """``settings`` with the unset engine fields filled in (module docstring). A batch job
    gives ``requests`` (None: a service) and ``sample_tokens`` (one request's video)."""
    video = video or VideoSettings()
    explicit = settings.model_fields_set
    chosen: dict[str, Any] = {}

    limit = model_max_positions(settings.model)
    if "max_model_len" not in explicit and limit is not None and settings.max_model_len > limit:
        chosen["max_model_len"] = limit
    if cpu:
        if "dtype" not in explicit:
            chosen["dtype"] = cpu_dtype(settings.model)
        if "enforce_eager" not in explicit:
            chosen["enforce_eager"] = True
        sequences = KV_MAX_SEQUENCES
        if settings.max_num_seqs is not None:
            sequences = min(sequences, settings.max_num_seqs)
        if requests is not None:
            sequences = max(1, min(sequences, requests))
        if "max_num_seqs" not in explicit:
            chosen["max_num_seqs"] = sequences
        if requests is not None and "max_model_len" not in explicit:
            current = settings.model_copy(update=chosen)
            chosen["max_model_len"] = min(current.max_model_len, _job_model_len(current, video))
        if "kv_cache_memory_bytes" not in explicit and "gpu_memory_utilization" not in explicit:
            per_sequence = None if requests is None or sample_tokens is None else \
                sample_tokens + PROMPT_TEXT_TOKENS + settings.max_tokens
            chosen.update(_cpu_kv_cache(settings.model_copy(update=chosen), explicit,
                                        available_bytes, sequences=sequences,
                                        per_sequence=per_sequence))
    current = settings.model_copy(update=chosen)
    if "max_num_batched_tokens" not in explicit:
        needed = encoder_tokens_needed(current, video)
        if cpu or needed > VLLM_DEFAULT_BATCHED_TOKENS:
            chosen["max_num_batched_tokens"] = max(needed, VLLM_DEFAULT_BATCHED_TOKENS)
    planned = settings.model_copy(update=chosen)
    given = {name: getattr(settings, name) for name in _PLANNED
             if name in explicit and name not in chosen}
    return EnginePlan(planned, chosen, given)


def _job_model_len(settings: ServingSettings, video: VideoSettings) -> int:
    """The context a batch job's longest request can need, in whole KV blocks."""
    tokens = encoder_tokens_needed(settings, video) + PROMPT_TEXT_TOKENS + settings.max_tokens
    return max(_MIN_MODEL_LEN, math.ceil(tokens / _KV_BLOCK_TOKENS) * _KV_BLOCK_TOKENS)


def _cpu_kv_cache(settings: ServingSettings, explicit: set[str],
                  available_bytes: int | None, *, sequences: int = KV_MAX_SEQUENCES,
                  per_sequence: int | None = None) -> dict[str, Any]:
    per_token = kv_bytes_per_token(settings.model, settings.dtype)
    free = available_memory_bytes() if available_bytes is None else available_bytes
    budget = min(int(free * KV_FREE_MEMORY_SHARE), KV_MAX_BYTES)
    if not per_token:
        return {"kv_cache_memory_bytes": max(budget, 256 << 20)}
    out: dict[str, Any] = {}
    max_len = settings.max_model_len
    if kv_sequence_bytes(per_token, max_len) > budget and "max_model_len" not in explicit:
        # The seed's context length does not fit this machine's memory; a shorter one does.
        fits = budget // per_token - _KV_BLOCK_TOKENS
        max_len = max(_MIN_MODEL_LEN, fits - fits % _KV_BLOCK_TOKENS)
        out["max_model_len"] = max_len
    wanted = kv_sequence_bytes(per_token, min(per_sequence or max_len, max_len)) * sequences
    out["kv_cache_memory_bytes"] = max(min(budget, wanted), kv_sequence_bytes(per_token, max_len))
    return out


def check_model_path(settings: ServingSettings) -> None:
    """Refuse a ``serving.model`` that names a local path holding no checkpoint (a model
    name, such as ``Qwen/Qwen2.5-VL-7B-Instruct``, passes). Cheap: no vLLM import."""
    model = Path(settings.model).expanduser()
    if not model.is_dir() and (model.exists() or _looks_like_path(settings.model)):
        raise ConfigError(
            f"serving.model {settings.model!r} is not a model directory (it does not exist "
            "or is not a folder): give the folder that holds config.json, or a model name "
            "such as Qwen/Qwen2.5-VL-7B-Instruct")
    if model.is_dir() and not (model / "config.json").is_file():
        raise ConfigError(f"serving.model {settings.model!r} has no config.json: give the "
                          "folder of a Hugging Face checkpoint")


def check_engine_limits(settings: ServingSettings, *, cpu: bool,
                        video: VideoSettings | None = None,
                        available_bytes: int | None = None) -> None:
    """Refuse settings that the engine would reject later or mishandle, with the fix."""
    check_model_path(settings)
    limit = model_max_positions(settings.model)
    if limit is not None and settings.max_model_len > limit:
        raise ConfigError(
            f"serving.max_model_len={settings.max_model_len} is above the model's own limit "
            f"(max_position_embeddings={limit} in {settings.model}/config.json): set "
            f"CAPTIONFLOW_SERVING__MAX_MODEL_LEN={limit} or lower, or leave it unset")
    if cpu and settings.tensor_parallel_size != 1:
        raise ConfigError("serving.tensor_parallel_size must be 1 on the CPU engine")
    if settings.limit_mm_per_prompt.get("video", 1) < 1:
        raise ConfigError("serving.limit_mm_per_prompt must allow one video "
                          "(e.g. {\"image\": 0, \"video\": 1})")
    if settings.max_num_batched_tokens is not None:
        needed = encoder_tokens_needed(settings, video or VideoSettings())
        if settings.max_num_batched_tokens < needed:
            raise ConfigError(
                f"serving.max_num_batched_tokens={settings.max_num_batched_tokens} is below "
                f"the largest video the sampling settings allow ({needed} tokens with "
                f"video.max_frames, max_pixels, total_pixels and min_pixels as set); vLLM "
                "sizes its encoder cache from it and would refuse such videos: set it to "
                f"{needed} or more (or leave it unset), or lower the video budgets")
    if not cpu:
        return
    free = available_memory_bytes() if available_bytes is None else available_bytes
    if settings.kv_cache_memory_bytes is None:
        total = _total_memory_bytes()
        wanted = int(total * settings.gpu_memory_utilization)
        if wanted > free:
            raise ConfigError(
                "the vLLM CPU backend reads serving.gpu_memory_utilization "
                f"({settings.gpu_memory_utilization}) as a share of all RAM: "
                f"{wanted >> 20} MiB, but only {free >> 20} MiB is free. Leave it unset (the "
                "KV cache is then sized from free memory), lower it, or set "
                "serving.kv_cache_memory_bytes")
        return
    needed = kv_sequence_bytes(kv_bytes_per_token(settings.model, settings.dtype),
                               settings.max_model_len)
    if needed and settings.kv_cache_memory_bytes < needed:
        raise ConfigError(
            f"serving.kv_cache_memory_bytes={settings.kv_cache_memory_bytes} cannot hold "
            f"one sequence of serving.max_model_len={settings.max_model_len} tokens "
            f"(needs about {needed} bytes): raise kv_cache_memory_bytes or lower "
            "max_model_len")
    if settings.kv_cache_memory_bytes > free:
        raise ConfigError(
            f"serving.kv_cache_memory_bytes={settings.kv_cache_memory_bytes} is more than "
            f"the {free} bytes of free memory: lower it, or leave it unset to size the KV "
            "cache from free memory")


def _looks_like_path(model: str) -> bool:
    """A local path rather than a hub id (``org/name``)."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or os.sep != "/" and \
        os.sep in model


def _total_memory_bytes() -> int:
    try:
        import psutil
        return int(psutil.virtual_memory().total)
    except ImportError:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
