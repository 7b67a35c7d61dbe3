"""A cheaper, bit-identical preprocessing path for transformers' Qwen2-VL video processor.

vLLM's frontend turns every clip into ``pixel_values_videos`` with transformers'
``Qwen2VLVideoProcessor`` (Qwen2-VL and Qwen2.5-VL). vLLM 0.32 asks it for raw pixels
(``mm_device_do_normalize``, on by default: rescale and normalize run on the device before
the vision tower), and the stock code still copies each clip three times:

1. into channels-first order (``permute(...).contiguous()``);
2. into patch order (a 10-dimensional permute and ``reshape``);
3. into the result (``torch.cat`` of the per-shape groups, even for one video).

This path makes one copy: straight from the channels-last frames into this video's rows
of the preallocated result, in patch order. About 40 -> 15 CPU-ms on a 20-frame 784x448
clip, in vLLM's single-thread multimodal executor.

Where the processor does rescale and normalize on the CPU (the transformers backend, or
vLLM with ``mm_device_do_normalize`` off), stock converts the whole clip to float32 first
and makes copies 2 and 3 in float32: about 240 CPU-ms on the same clip. Here the uint8
frames are put into patch order first (a quarter of the bytes), then ``(x - mean) / std``
is written into the float32 result in two numpy passes: the float32 operations
torchvision's ``normalize`` runs (``float32(x) - mean``, then ``/ std``, with mean and std
already scaled by 1/rescale_factor as transformers fuses them), element by element, so
the result is bit-identical. About 40 CPU-ms.

Tests compare both paths with the stock output with ``torch.equal``. Anything else goes to
the stock code unchanged: tensors not uint8 or not on the CPU, a ``device`` argument,
rescale without normalize, frame counts that need temporal padding, sizes off the patch
grid. When the processor's resize changes the frame size, the stock resize runs on the
same contiguous input it always gets, and only the patchify (and normalize) is replaced.

``install()`` patches the class in this process only: the frontend of the in-process
engine. A ``vllm serve`` started where captionflow is installed gets it from captionflow's
vLLM plugin (:mod:`captionflow.serving.vllm_plugin`).
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# The parameters of the stock ``_preprocess`` this path replaces; a transformers release
# that renames any of them gets the stock code, not a silently different one.
_PREPROCESS_PARAMS = frozenset({
    "videos", "do_resize", "size", "resample", "do_rescale", "rescale_factor",
    "do_normalize", "image_mean", "image_std", "patch_size", "temporal_patch_size",
    "merge_size", "cap_pixels_per_frame", "return_tensors"})
_PREPARE_PARAMS = frozenset({"videos", "do_convert_rgb", "input_data_format", "device"})

_stock: dict[str, Any] = {}
# Where to say, once, that a clip went through the fast path (install's ``announce_to``).
_announce: list[logging.Logger] = []


def install(announce_to: logging.Logger | None = None) -> bool:
    """Patch ``Qwen2VLVideoProcessor`` in this process; True when the fast path is on.

    Idempotent. Returns False (and leaves transformers alone) when the processor's
    internals are not the ones this path was written against. With ``announce_to``, the
    first clip through the fast path logs an INFO line there naming this process."""
    if announce_to is not None:
        _announce[:] = [announce_to]
    try:
        from transformers import Qwen2VLVideoProcessor
    except ImportError:
        return False
    if _stock:
        return True
    preprocess = Qwen2VLVideoProcessor._preprocess
    prepare = Qwen2VLVideoProcessor._prepare_input_videos
    if not (_PREPROCESS_PARAMS <= set(inspect.signature(preprocess).parameters)
            and _PREPARE_PARAMS <= set(inspect.signature(prepare).parameters)
            and callable(getattr(Qwen2VLVideoProcessor, "resize", None))):
        log.warning("transformers' Qwen2VLVideoProcessor is not the version the fast video "
                    "preprocessing was written for; using its stock code (slower, same "
                    "output)")
        return False
    _stock["preprocess"] = preprocess
    _stock["prepare"] = prepare
    cls: Any = Qwen2VLVideoProcessor
    cls._preprocess = _preprocess
    cls._prepare_input_videos = _prepare_input_videos
    return True


def uninstall() -> None:
    """Restore the stock methods (benchmarks and tests compare both)."""
    if not _stock:
        return
    from transformers import Qwen2VLVideoProcessor

    cls: Any = Qwen2VLVideoProcessor
    cls._preprocess = _stock.pop("preprocess")
    cls._prepare_input_videos = _stock.pop("prepare")


def installed() -> bool:
    return bool(_stock)


def _prepare_input_videos(self: Any, videos: Any, do_convert_rgb: bool | None = None,
                          input_data_format: Any = None, device: Any = None) -> list[Any]:
    """Channels-first *views* of channels-last uint8 RGB arrays, where stock copies.

    Only for classes whose ``_preprocess`` is this module's (a subclass with its own
    patchify needs contiguous tensors); the fast ``_preprocess`` makes a view contiguous
    itself wherever it hands one to stock code."""
    import torch
    from transformers.image_utils import ChannelDimension, infer_channel_dimension_format

    stock = _stock["prepare"]
    if type(self)._preprocess is not _preprocess or device is not None:
        return stock(self, videos=videos, do_convert_rgb=do_convert_rgb,
                     input_data_format=input_data_format, device=device)
    prepared = []
    for video in videos:
        if not (isinstance(video, np.ndarray) and video.dtype == np.uint8 and video.ndim == 4
                and video.shape[-1] == 3):
            return stock(self, videos=videos, do_convert_rgb=do_convert_rgb,
                         input_data_format=input_data_format, device=device)
        layout = input_data_format or infer_channel_dimension_format(video)
        if layout != ChannelDimension.LAST:
            return stock(self, videos=videos, do_convert_rgb=do_convert_rgb,
                         input_data_format=input_data_format, device=device)
        # Three channels: stock's RGB conversion of a tensor leaves it as it is.
        prepared.append(torch.from_numpy(video).permute(0, 3, 1, 2))
    return prepared


def _preprocess(self: Any, videos: list[Any], do_resize: bool, size: Any, resample: Any,
                do_rescale: bool, rescale_factor: float, do_normalize: bool,
                image_mean: Any, image_std: Any, patch_size: int | None = None,
                temporal_patch_size: int | None = None, merge_size: int | None = None,
                cap_pixels_per_frame: bool | None = None, return_tensors: Any = None,
                **kwargs: Any) -> Any:
    import torch
    from transformers.feature_extraction_utils import BatchFeature

    def stock() -> Any:
        return _stock["preprocess"](
            self, videos=[v.contiguous() for v in videos], do_resize=do_resize, size=size,
            resample=resample, do_rescale=do_rescale, rescale_factor=rescale_factor,
            do_normalize=do_normalize, image_mean=image_mean, image_std=image_std,
            patch_size=patch_size, temporal_patch_size=temporal_patch_size,
            merge_size=merge_size, cap_pixels_per_frame=cap_pixels_per_frame,
            return_tensors=return_tensors, **kwargs)

    normalize = bool(do_rescale and do_normalize)
    supported = (
        (normalize or not (do_rescale or do_normalize))
        and (not normalize or (np.size(image_mean) == 3 and np.size(image_std) == 3))
        and patch_size and temporal_patch_size and merge_size and videos
        and all(isinstance(v, torch.Tensor) and v.device.type == "cpu"
                and v.dtype == torch.uint8 and v.ndim == 4 and v.shape[1] == 3
                for v in videos))
    if not supported:
        return stock()
    resized = []
    for video in videos:
        if do_resize:
            target = _resized_shape(self, video, size, resample, patch_size, merge_size,
                                    temporal_patch_size, bool(cap_pixels_per_frame))
            if target != tuple(video.shape[-2:]):
                video = self.resize(
                    videos=video.contiguous().unsqueeze(0), size=size, resample=resample,
                    factor=patch_size * merge_size, temporal_factor=temporal_patch_size,
                    cap_pixels_per_frame=bool(cap_pixels_per_frame))[0]
                if video.dtype != torch.uint8:
                    return stock()
        frames, _, height, width = video.shape
        block = patch_size * merge_size
        if frames % temporal_patch_size or height % block or width % block:
            return stock()
        resized.append(video)

    grids = [(v.shape[0] // temporal_patch_size, v.shape[2] // patch_size,
              v.shape[3] // patch_size) for v in resized]
    rows = [t * h * w for t, h, w in grids]
    # torch's allocator, as stock: numpy asks for transparent huge pages on large arrays,
    # and the kernel's compaction for them can cost more than the copy it is for.
    out = torch.empty((sum(rows), 3 * temporal_patch_size * patch_size * patch_size),
                      dtype=torch.float32 if normalize else torch.uint8)
    out_np = out.numpy()
    if normalize:
        # Stock fuses rescale into normalize this way (float32 tensors times 1/rescale_factor).
        mean = (torch.tensor(image_mean) * (1.0 / rescale_factor)).numpy().reshape(1, 3, 1)
        std = (torch.tensor(image_std) * (1.0 / rescale_factor)).numpy().reshape(1, 3, 1)
    if _announce:
        _announce_first_use()
    start = 0
    for video, count in zip(resized, rows):
        patches = _patch_order(video, patch_size, merge_size, temporal_patch_size)
        if normalize:
            ordered = torch.empty(patches.shape, dtype=torch.uint8).numpy()
            ordered[...] = patches
            dest = out_np[start:start + count].reshape(count, 3, -1)
            np.subtract(ordered.reshape(count, 3, -1), mean, out=dest, dtype=np.float32)
            np.divide(dest, std, out=dest)
        else:
            # Raw pixels (vLLM's default: it normalizes on the device): one copy, straight
            # from the frames into this video's rows of the output.
            out_np[start:start + count].reshape(patches.shape)[...] = patches
        start += count
    return BatchFeature(
        data={"pixel_values_videos": out,
              "video_grid_thw": torch.tensor([list(g) for g in grids])},
        tensor_type=return_tensors)


def _resized_shape(self: Any, video: Any, size: Any, resample: Any, patch_size: int,
                   merge_size: int, temporal_patch_size: int,
                   cap_pixels_per_frame: bool) -> tuple[int, int]:
    """The size the processor's own resize picks, from its own code run on a shape-only
    (meta) tensor, so no pixels are touched and no sizing rule is copied here."""
    import torch

    probe = torch.empty((1, *video.shape), dtype=video.dtype, device="meta")
    out = self.resize(videos=probe, size=size, resample=resample,
                      factor=patch_size * merge_size, temporal_factor=temporal_patch_size,
                      cap_pixels_per_frame=cap_pixels_per_frame)
    return int(out.shape[-2]), int(out.shape[-1])


def _announce_first_use() -> None:
    try:
        logger = _announce.pop()  # atomic: a second thread here finds the list empty
    except IndexError:
        return
    logger.info("captionflow fast video preprocessing in use (pid %d)", os.getpid())


def _patch_order(video: Any, patch_size: int, merge_size: int,
                 temporal_patch_size: int) -> np.ndarray:
    """A strided numpy view of ``(T, 3, H, W)`` uint8 (any strides) in the processor's
    patch order: ``(t, h-block, w-block, h-merge, w-merge, channel, t-patch, y, x)``."""
    frames, channels, height, width = video.shape
    grid_t = frames // temporal_patch_size
    grid_h, grid_w = height // patch_size, width // patch_size
    x = video.reshape(grid_t, temporal_patch_size, channels, grid_h // merge_size,
                      merge_size, patch_size, grid_w // merge_size, merge_size, patch_size)
    return x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).numpy()
