"""Load an event's ``image`` references for the model: fetched like videos, resized like frames.

Each reference goes through :func:`captionflow.video.fetchers.fetch`, so images obey the same
allowed roots, schemes, HTTP guards and size limit (``video.max_video_bytes``) as videos.
Decoding is Pillow's (EXIF orientation applied, converted to RGB, the first frame of an
animation), then qwen-vl-utils' ``fetch_image`` resize: the nearest multiple-of-28 size
within ``[video.min_pixels, video.max_pixels]`` keeping the aspect ratio (bicubic).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from captionflow.config import VideoSettings
from captionflow.errors import InvalidRequestError, VideoTooLargeError, VideoUnreadableError
from captionflow.video.fetchers import fetch
from captionflow.video.sampling import smart_resize


def load_images(refs: Sequence[str], settings: VideoSettings) -> tuple[np.ndarray, ...]:
    """Each reference as a uint8 ``(H, W, 3)`` RGB array, H and W multiples of 28.

    Raises the fetch errors of :func:`fetch` (``video_not_found``, ``video_forbidden``,
    ``video_too_large``, ...), :class:`VideoUnreadableError` for a file Pillow cannot
    decode and :class:`InvalidRequestError` for an impossible size.
    """
    if any(not isinstance(ref, str) or not ref.strip() for ref in refs):
        raise InvalidRequestError("image references must be non-blank strings")
    return tuple(load_image(ref, settings) for ref in refs)


def load_image(ref: str, settings: VideoSettings) -> np.ndarray:
    local = fetch(ref, settings)
    try:
        return _decode(ref, str(local.path), settings)
    finally:
        local.release()


def _decode(ref: str, path: str, settings: VideoSettings) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Above Pillow's pixel limit: refuse, do not decode a decompression bomb.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                image = ImageOps.exif_transpose(opened)
                image = image.convert("RGB")
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise VideoTooLargeError(f"image {ref!r} has too many pixels: {e}") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise VideoUnreadableError(f"image {ref!r} cannot be decoded: {e}") from e
    width, height = image.size
    try:
        new_h, new_w = smart_resize(height, width, min_pixels=settings.min_pixels,
                                    max_pixels=settings.max_pixels)
    except InvalidRequestError as e:
        raise InvalidRequestError(f"image {ref!r}: {e.message}") from e
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    # A writable copy: torch warns on (and may not write into) read-only arrays.
    return np.array(image, dtype=np.uint8)
