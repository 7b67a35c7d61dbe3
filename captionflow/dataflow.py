"""DataFlow-MM's video caption API on captionflow's frames and serving code.

A DataFlow pipeline ports by changing its imports only::

    from captionflow.dataflow import VideoToCaptionGenerator, LocalModelVLMServing_vllm, FileStorage

The classes are synchronous, as DataFlow's are; each run drives captionflow's async batch
runner in the serving object's own event loop (the engine lives in that loop). Unlike the
seed, a bad row records ``{"code", "message"}`` in its ``error`` field instead of failing
the run, rows run concurrently, and a rerun carries over rows the step file already
captioned. docs/batch.md maps every seed parameter to its captionflow setting.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from rich.console import Console

from captionflow.batch.job import run_file
from captionflow.batch.progress import row_progress
from captionflow.batch.rows import RowKeys
from captionflow.batch.runner import BatchReport
from captionflow.batch.storage import FileStorage
from captionflow.config import DEFAULT_MODEL, ENV_PREFIX, ServingSettings, Settings
from captionflow.errors import ConfigError, InternalError
from captionflow.logs import setup_library_logging
from captionflow.serving.base import CaptionBackend
from captionflow.serving.factory import make_backend

__all__ = ["FileStorage", "LocalModelVLMServing_vllm", "VideoToCaptionGenerator"]

log = logging.getLogger(__name__)
T = TypeVar("T")
_SERVING_ENV = f"{ENV_PREFIX}SERVING__"
# LocalModelVLMServing_vllm's defaults (DataFlow-MM's), as serving fields.
_SEED_DEFAULTS: dict[str, Any] = {
    "model": DEFAULT_MODEL, "download_dir": None, "tensor_parallel_size": 1,
    "temperature": 0.7, "top_p": 0.9, "max_tokens": 2048, "top_k": -1,
    "repetition_penalty": 1.0, "seed": None, "max_model_len": 51200,
    "gpu_memory_utilization": 0.9}


def env_serving_fields() -> set[str]:
    """Serving fields set by ``CAPTIONFLOW_SERVING__*`` variables. They win over a script's
    arguments, so one unedited script runs on a GPU box and on the CPU test engine."""
    present = {key.upper() for key in os.environ}
    return {name for name in ServingSettings.model_fields
            if f"{_SERVING_ENV}{name.upper()}" in present}


def seed_settings(base: Settings, fields: dict[str, Any]) -> Settings:
    """``base`` (config file and environment) with the script's serving fields applied,
    except those the environment sets."""
    unknown = set(fields) - set(ServingSettings.model_fields)
    if unknown:
        raise ConfigError(
            f"unknown serving option(s) {sorted(unknown)}; extra keyword arguments must be "
            f"captionflow serving settings, e.g. dtype, kv_cache_memory_bytes, enforce_eager, "
            f"max_num_batched_tokens, max_num_seqs, work_dir")
    pinned = env_serving_fields()
    chosen = {k: v for k, v in fields.items() if k not in pinned}
    given = base.serving.model_dump(include=base.serving.model_fields_set)
    try:
        # Built from what was given only, so unset engine fields stay unset for the plan.
        serving = ServingSettings.model_validate({**given, **chosen})
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ConfigError(f"invalid serving options: {problems}") from e
    update: dict[str, Any] = {"serving": serving}
    if "quality_gate_retries" not in base.worker.model_fields_set:
        # The seed asks the engine once per row; the quality gate is opt-in here.
        update["worker"] = base.worker.model_copy(update={"quality_gate_retries": 0})
    return base.model_copy(update=update)


class LocalModelVLMServing_vllm:
    """Qwen2.5-VL on vLLM, with DataFlow-MM's parameter names and defaults.

    The engine starts on the first row that reaches the model (or :meth:`start_serving`)
    and stops at :meth:`cleanup` or interpreter exit. Extra keyword arguments are captionflow
    serving settings (``dtype``, ``kv_cache_memory_bytes``, ``enforce_eager``, ...).
    """

    def __init__(self, hf_model_name_or_path: str = DEFAULT_MODEL,
                 hf_cache_dir: str | None = None, hf_local_dir: str | None = None,
                 vllm_tensor_parallel_size: int = 1, vllm_temperature: float = 0.7,
                 vllm_top_p: float = 0.9, vllm_max_tokens: int = 2048, vllm_top_k: int = -1,
                 vllm_repetition_penalty: float = 1.0, vllm_seed: int | None = None,
                 vllm_max_model_len: int = 51200, vllm_gpu_memory_utilization: float = 0.9,
                 **engine_kwargs: Any) -> None:
        setup_library_logging()
        model = hf_model_name_or_path
        if hf_local_dir and (Path(hf_local_dir) / "config.json").is_file():
            model = hf_local_dir  # a checkpoint already downloaded there wins, as in DataFlow
        fields: dict[str, Any] = {
            "backend": "vllm", "model": model, "download_dir": hf_cache_dir,
            "tensor_parallel_size": vllm_tensor_parallel_size,
            "temperature": vllm_temperature, "top_p": vllm_top_p,
            "max_tokens": vllm_max_tokens, "top_k": vllm_top_k,
            "repetition_penalty": vllm_repetition_penalty, "seed": vllm_seed,
            "max_model_len": vllm_max_model_len,
            "gpu_memory_utilization": vllm_gpu_memory_utilization}
        # A value equal to the seed's default is what every ported script writes, not a
        # choice: it stays unset, so the engine plan may fill it in for the machine (a CPU
        # has no GPU memory share, a small model a shorter context).
        fields = {k: v for k, v in fields.items()
                  if k == "backend" or k not in _SEED_DEFAULTS or v != _SEED_DEFAULTS[k]}
        self.settings = seed_settings(Settings.load(), {**fields, **engine_kwargs})
        self._backend: CaptionBackend | None = None
        self._owned = True
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_backend(cls, backend: CaptionBackend, settings: Settings) -> LocalModelVLMServing_vllm:
        """Wrap a backend someone else starts and closes (tests, embedding in a service)."""
        self = cls.__new__(cls)
        self.settings, self._backend, self._owned, self._loop = settings, backend, False, None
        return self

    @property
    def backend(self) -> CaptionBackend:
        if self._backend is None:
            self._backend = make_backend(self.settings.serving, self.settings.video)
            atexit.register(self.cleanup)
        return self._backend

    def start_serving(self) -> None:
        self.run_sync(self.backend.start())

    def cleanup(self) -> None:
        """Stop the engine (if this object started it) and its event loop."""
        if self._owned and self._backend is not None and self._loop is not None \
                and not self._loop.is_closed():
            self._loop.run_until_complete(self._backend.close())
        if self._loop is not None and not self._loop.is_closed():
            self._loop.close()
        if self._owned:
            self._backend = None

    def run_sync(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` in this object's event loop, the one its engine lives in."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            coro.close()
            raise InternalError(
                "the DataFlow-style API is synchronous and cannot run inside a running event "
                "loop; await VideoToCaptionGenerator.arun(...) there instead")
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
        try:
            return self._loop.run_until_complete(coro)
        finally:
            if self._owned and self._backend is not None:
                # atexit runs the last registered first. vLLM registers its finalizers
                # (weakref.finalize's exit hook) while the engine starts; run after ours,
                # they would kill the engine core under its live output task, which logs
                # an EngineDeadError traceback at exit. Registered again, ours runs first.
                atexit.unregister(self.cleanup)
                atexit.register(self.cleanup)


class VideoToCaptionGenerator:
    """Caption the rows of a DataFlow step: every row gets ``output_key`` (None on failure,
    with ``error`` set) and its conversation's first human turn set to the prompt used."""

    def __init__(self, vlm_serving: LocalModelVLMServing_vllm,
                 prompt_template: Any = None) -> None:
        self.vlm_serving = vlm_serving
        self.prompt_template = prompt_template

    def _settings(self) -> Settings:
        settings = self.vlm_serving.settings
        if self.prompt_template is None:
            return settings
        # A template object (DataFlow style) or plain text: the prompt for rows whose human
        # turn is empty; a row's own non-empty human turn still wins, as in the worker.
        build = getattr(self.prompt_template, "build_prompt", None)
        prompt = str(build() if callable(build) else self.prompt_template)
        serving = settings.serving.model_copy(update={"default_prompt": prompt})
        return settings.model_copy(update={"serving": serving})

    async def arun(self, storage: FileStorage, input_image_key: str = "image",
                   input_video_key: str = "video",
                   input_conversation_key: str = "conversation",
                   output_key: str = "caption") -> BatchReport:
        """:meth:`run` for callers already inside an event loop (the engine must live in
        that loop)."""
        keys = RowKeys(video=input_video_key, image=input_image_key,
                       conversation=input_conversation_key, output=output_key)
        console = Console(stderr=True)
        with row_progress(console) as progress:
            report = await run_file(storage.read_path, storage.write_path,
                                    cache_type=storage.cache_type, settings=self._settings(),
                                    backend=self.vlm_serving.backend, keys=keys,
                                    on_row=progress.on_row, on_total=progress.on_total)
        console.print(f"{type(self).__name__}: {report.summary()} -> {storage.write_path}",
                      soft_wrap=True, markup=False)
        return report

    def run(self, storage: FileStorage, input_image_key: str = "image",
            input_video_key: str = "video", input_conversation_key: str = "conversation",
            output_key: str = "caption") -> BatchReport:
        return self.vlm_serving.run_sync(self.arun(
            storage, input_image_key=input_image_key, input_video_key=input_video_key,
            input_conversation_key=input_conversation_key, output_key=output_key))

