"""The same model through Hugging Face transformers, for CPUs and debugging.

``generate()`` runs in one worker thread at a time (one model, no batching); the event loop
stays free. Greedy float32 output equals the vLLM backend's for the same clip.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from captionflow.config import ServingSettings
from captionflow.errors import (
    ConfigError,
    EngineDeadError,
    EngineRequestFailedError,
    InvalidRequestError,
    PromptTooLongError,
)
from captionflow.serving import fast_video_processor
from captionflow.serving.base import CaptionBackend, CaptionRequest, CaptionResult
from captionflow.serving.prompt import build_messages, render_prompt, video_metadata
from captionflow.serving.vllm_engine import sampling_values


class TransformersBackend(CaptionBackend):
    name = "transformers"

    def __init__(self, settings: ServingSettings) -> None:
        self.settings = settings
        self._model: Any = None
        self._processor: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

    async def start(self) -> None:
        if self._model is not None:
            return
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-generate")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, self._load)

    def _load(self) -> None:
        import torch
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        dtype = self.settings.dtype
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype, None)
        if torch_dtype is None:
            raise ConfigError(f"serving.dtype={dtype!r} is not a torch dtype; use auto, "
                              "float32, bfloat16 or float16")
        kwargs: dict[str, Any] = {"trust_remote_code": self.settings.trust_remote_code}
        if self.settings.download_dir:
            kwargs["cache_dir"] = str(self.settings.download_dir)
        fast_video_processor.install()  # same pixel values, a fraction of the CPU
        self._processor = AutoProcessor.from_pretrained(self.settings.model, **kwargs)
        self._model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            self.settings.model, dtype=torch_dtype, **kwargs).eval()
        _use_qwen_rope_index(self._model)

    async def close(self) -> None:
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._model = None

    async def healthy(self) -> bool:
        return self._model is not None and not self._closed

    def model_info(self) -> dict[str, Any]:
        return {"model": self.settings.served_model_name or self.settings.model,
                "backend": self.name, "dtype": self.settings.dtype}

    def processor_inputs(self, request: CaptionRequest) -> Any:
        """What the Hugging Face processor makes of a request (token ids, pixels, grids,
        ``second_per_grid_ts``); tests compare it with what the engines see."""
        messages = build_messages(request.prompt, system_prompt=self.settings.system_prompt,
                                  default_prompt=self.settings.default_prompt,
                                  images=len(request.images),
                                  video=request.clip is not None)
        text = render_prompt(self._processor.tokenizer, messages)
        extra: dict[str, Any] = {"images": list(request.images)} if request.images else {}
        if request.clip is None:
            return self._processor(text=[text], return_tensors="pt", **extra)
        metadata = {k: v for k, v in video_metadata(request.clip).items()
                    if k != "do_sample_frames"}
        return self._processor(text=[text], videos=[request.clip.frames],
                               video_metadata=[metadata], do_sample_frames=False,
                               return_tensors="pt", **extra)

    async def caption(self, request: CaptionRequest) -> CaptionResult:
        if self._closed or self._pool is None:
            raise EngineDeadError("the transformers backend is closed; call start() first")
        if request.json_schema is not None:
            raise InvalidRequestError(
                f"request {request.request_id}: structured captions (options.json_schema) need "
                "the vllm or openai backend; the transformers backend cannot constrain output")
        values = sampling_values(self.settings, dict(request.sampling))
        loop = asyncio.get_running_loop()
        queued = time.perf_counter()
        try:
            return await loop.run_in_executor(
                self._pool, self._generate, request, values, queued)
        except RuntimeError as e:
            if self._closed:
                raise EngineDeadError("the transformers backend was closed") from e
            raise EngineRequestFailedError(f"request {request.request_id}: {e}") from e

    def _generate(self, request: CaptionRequest, values: dict[str, Any],
                  queued: float) -> CaptionResult:
        import torch

        started = time.perf_counter()
        try:
            inputs = self.processor_inputs(request)
        except ValueError as e:
            raise InvalidRequestError(f"request {request.request_id}: {e}") from e
        prompt_ids = inputs["input_ids"][0]
        limit = self.settings.max_model_len
        if len(prompt_ids) >= limit:
            raise PromptTooLongError(
                f"request {request.request_id}: prompt of {len(prompt_ids)} tokens does not "
                f"fit serving.max_model_len={limit}; send fewer frames or pixels")
        max_new = min(int(values["max_tokens"]), limit - len(prompt_ids))
        greedy = float(values["temperature"]) == 0.0
        gen: dict[str, Any] = {"max_new_tokens": max_new, "do_sample": not greedy,
                               "repetition_penalty": float(values["repetition_penalty"])}
        if not greedy:
            gen.update(temperature=float(values["temperature"]), top_p=float(values["top_p"]))
            if values["top_k"] and int(values["top_k"]) > 0:
                gen["top_k"] = int(values["top_k"])
            if values["seed"] is not None:
                torch.manual_seed(int(values["seed"]))
        model_dtype = self._model.dtype
        inputs = {k: (v.to(model_dtype) if k.startswith("pixel_values") else v)
                  for k, v in inputs.items()}
        with torch.inference_mode():
            out = self._model.generate(**inputs, **gen)
        new_ids = out[0, len(prompt_ids):].tolist()
        eos = self._model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        # Like vLLM, the stop token stays in token_ids and out of the text.
        finish = "stop" if new_ids and new_ids[-1] in eos_ids else "length"
        text = self._processor.tokenizer.decode(new_ids, skip_special_tokens=True)
        done = time.perf_counter()
        return CaptionResult(
            request_id=request.request_id, text=text, finish_reason=finish,
            prompt_tokens=len(prompt_ids), completion_tokens=len(new_ids),
            token_ids=tuple(new_ids), queue_ms=(started - queued) * 1000.0,
            inference_ms=(done - started) * 1000.0,
            prompt_token_ids=tuple(prompt_ids.tolist()))


def _use_qwen_rope_index(model: Any) -> None:
    """Give ``model`` the M-RoPE position ids of the original Qwen2.5-VL (and of vLLM).

    transformers 5.19's ``get_rope_index`` starts the text after a video at ``start +
    max(grid_h, grid_w)``, ignoring how far the temporal ids reach (``(grid_t - 1) *
    tokens_per_second * second_per_grid_ts``), while its decode offset (``rope_deltas``) does
    count them; Qwen2.5-VL's reference code (transformers 4.x) and vLLM 0.32 start that text
    at the largest id so far + 1. Whenever the temporal ids reach past the spatial ones the
    two disagree (8 frames at 0.5, 1 or 2 fps on the tiny model). Prompts with a video (and
    any images beside it, each image one temporal step at id 0) are re-derived here; anything
    else (text, images alone, where both rules agree) keeps transformers' own function.
    """
    import torch

    inner = model.model
    original = inner.get_rope_index
    vision = model.config.vision_config
    merge = int(vision.spatial_merge_size)
    tokens_per_second = float(getattr(vision, "tokens_per_second", 1.0))
    video_token = int(model.config.video_token_id)
    image_token = int(model.config.image_token_id)

    def get_rope_index(input_ids=None, image_grid_thw=None, video_grid_thw=None,
                       attention_mask=None, second_per_grid_ts=None, **kwargs):
        if input_ids is None or video_grid_thw is None:
            return original(input_ids, image_grid_thw=image_grid_thw,
                            video_grid_thw=video_grid_thw, attention_mask=attention_mask,
                            second_per_grid_ts=second_per_grid_ts, **kwargs)
        position_ids = torch.ones(3, *input_ids.shape, dtype=input_ids.dtype,
                                  device=input_ids.device)
        deltas = []
        grids = iter(video_grid_thw.tolist())
        image_grids = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
        seconds = iter(second_per_grid_ts.tolist() if second_per_grid_ts is not None
                       else [1.0] * len(video_grid_thw))
        for row, ids in enumerate(input_ids):
            keep = attention_mask[row].bool() if attention_mask is not None else None
            tokens = (ids[keep] if keep is not None else ids).tolist()
            parts: list[torch.Tensor] = []
            start = 0  # first token not yet given a position
            next_id = 0  # the position the next text token gets
            while True:
                offset = _next_vision_token(tokens, start, video_token, image_token)
                if offset < 0:
                    break
                if tokens[offset] == video_token:
                    t, h, w = next(grids)
                    factor = tokens_per_second * float(next(seconds))
                else:  # an image: one temporal step, temporal id 0
                    t, h, w = next(image_grids)
                    factor = 0.0
                h, w = h // merge, w // merge
                text_len = offset - start
                parts.append(torch.arange(text_len).expand(3, -1) + next_id)
                grid = torch.stack(torch.meshgrid(
                    (torch.arange(t) * factor).long(), torch.arange(h), torch.arange(w),
                    indexing="ij")).reshape(3, -1)
                parts.append(grid + next_id + text_len)
                next_id = int(parts[-1].max()) + 1
                start = offset + t * h * w
            parts.append(torch.arange(len(tokens) - start).expand(3, -1) + next_id)
            positions = torch.cat(parts, dim=1).to(position_ids)
            if keep is not None:
                position_ids[:, row, keep] = positions
            else:
                position_ids[:, row] = positions
            deltas.append(int(positions.max()) + 1 - len(tokens))
        return position_ids, torch.tensor(deltas, device=input_ids.device).unsqueeze(1)

    inner.get_rope_index = get_rope_index


def _next_vision_token(tokens: list[int], start: int, video_token: int,
                       image_token: int) -> int:
    """Index of the first video or image token at or after ``start``; -1 when none."""
    for i in range(start, len(tokens)):
        if tokens[i] == video_token or tokens[i] == image_token:
            return i
    return -1
