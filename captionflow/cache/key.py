"""The caption key: one hash of everything that decides what the engine is asked.

``caption_key(engine, request)`` is the sha256 of the canonical JSON (sorted keys, no
spaces) of ``{"v": KEY_VERSION, "engine": ..., "request": ...}``:

- ``engine`` (:func:`engine_identity`, once per driver): backend, model and its revision,
  served model name, dtype, system prompt, processor kwargs, the openai video transport
  and the quality gate's settings.
- ``request`` (:func:`request_identity`, per caption): the content validator, the clip as
  planned (time span, window, the source frame indices, sampling rate and output size
  after every clamp, decode device kind), the digests of images sent to the model, the
  prompt text, the sampling values after the settings' defaults are applied, the JSON
  Schema. A summary has no clip: its prompt holds the window captions and their spans.

Equal requests give equal keys; any difference gives another. docs/captions.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from captionflow.config import Settings
from captionflow.serving.base import SAMPLING_KEYS

KEY_VERSION = 1


def canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY)


def caption_key(engine: Mapping[str, Any], request: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(
        {"v": KEY_VERSION, "engine": engine, "request": request})).hexdigest()


def model_revision(model: str) -> str:
    """A local model directory's fingerprint (its small JSON files' bytes, every other
    file's name and size), or the name itself for a hub id."""
    root = Path(model)
    if not root.is_dir():
        return model
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        digest.update(rel.encode())
        if path.suffix == ".json" and path.stat().st_size <= 1 << 20:
            digest.update(path.read_bytes())
        else:
            digest.update(str(path.stat().st_size).encode())
    return "dir-sha256:" + digest.hexdigest()


def engine_identity(settings: Settings, model_name: str) -> dict[str, Any]:
    """What every caption of this driver shares; ``model_name`` is the backend's."""
    s, w = settings.serving, settings.worker
    return {
        "backend": s.backend,
        "model": model_name,
        "revision": settings.cache.model_revision or model_revision(s.model),
        "served_model_name": s.served_model_name,
        "dtype": s.dtype,
        "system_prompt": s.system_prompt,
        "mm_processor_kwargs": s.mm_processor_kwargs,
        "transport": s.openai_video_transport if s.backend == "openai" else None,
        "gate": {"retries": w.quality_gate_retries,
                 "repetition_penalty": w.quality_gate_repetition_penalty,
                 "temperature": w.quality_gate_temperature},
    }


def effective_sampling(settings: Settings, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling values the engine gets: the settings' defaults, then the event's."""
    values = {k: getattr(settings.serving, k) for k in sorted(SAMPLING_KEYS)}
    values.update(overrides)
    return values


def image_digest(image: np.ndarray) -> str:
    digest = hashlib.sha256(str((image.shape, image.dtype.str)).encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


def request_identity(*, content: str | None, clip: Mapping[str, Any] | None, prompt: str,
                     sampling: Mapping[str, Any], schema: Mapping[str, Any] | None,
                     images: Sequence[str] = ()) -> dict[str, Any]:
    return {"content": content, "clip": clip, "images": list(images), "prompt": prompt,
            "sampling": dict(sampling), "schema": schema}


def sampled_without_seed(sampling: Mapping[str, Any]) -> bool:
    return float(sampling.get("temperature") or 0) > 0 and sampling.get("seed") is None
