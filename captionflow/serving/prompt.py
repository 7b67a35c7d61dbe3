"""The chat prompt every backend sends: system text, the event's images, one video, the
user's text.

One place builds the messages, so the in-process engine, the remote server and the
transformers backend render the same prompt through the model's own chat template.
"""

from __future__ import annotations

from typing import Any

from captionflow.config import DEFAULT_PROMPT, DEFAULT_SYSTEM_PROMPT
from captionflow.video.clip import Clip


def user_text(prompt: str | None, default_prompt: str = DEFAULT_PROMPT) -> str:
    """The user's text, or the default caption prompt when it is empty or blank."""
    return prompt if prompt and prompt.strip() else default_prompt


def build_messages(prompt: str | None, *, system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                   default_prompt: str = DEFAULT_PROMPT,
                   video_part: dict[str, Any] | None = None, images: int = 0,
                   image_parts: list[dict[str, Any]] | None = None,
                   video: bool = True) -> list[dict[str, Any]]:
    """Chat messages with the images, then the video, then the text, as Qwen2.5-VL was
    trained (media before the question).

    ``images`` bare ``{"type": "image"}`` placeholders come first; ``image_parts`` replaces
    them (e.g. OpenAI ``image_url`` parts). ``video_part`` replaces the bare
    ``{"type": "video"}`` placeholder, e.g. with an OpenAI ``video_url`` part; without
    ``video`` the user turn has no video (a text-only request).
    """
    messages: list[dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    if image_parts is None:
        image_parts = [{"type": "image"} for _ in range(images)]
    messages.append({"role": "user", "content": [
        *image_parts,
        *([video_part or {"type": "video"}] if video else []),
        {"type": "text", "text": user_text(prompt, default_prompt)},
    ]})
    return messages


def render_prompt(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    """The prompt text from the model's chat template, ending with the assistant turn."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(text, str):
        raise TypeError(f"chat template rendered {type(text).__name__}, expected str")
    return text


QWEN2_5_VL = "qwen2_5_vl"
QWEN3_VL = "qwen3_vl"


def model_family(model_type: str | None) -> str:
    """The video handling a model needs, from its config's ``model_type``: Qwen3-VL (dense
    and MoE) or the Qwen2/2.5-VL default."""
    return QWEN3_VL if (model_type or "").startswith("qwen3_vl") else QWEN2_5_VL


def video_metadata(clip: Clip, family: str = QWEN2_5_VL) -> dict[str, Any]:
    """Metadata for the ``(frames, metadata)`` tuple, per model family.

    Qwen2.5-VL: :meth:`Clip.vllm_metadata` (the clip in its own frame numbering, so that
    the sampling rate drives the temporal position ids). Qwen3-VL writes each frame pair's
    time into the prompt (``<12.5 seconds>``), as ``frames_indices / fps``: so the clip is
    described in the source's numbering and rate, and a window of a long video gets its
    times in the whole video rather than from 0."""
    if family != QWEN3_VL:
        return clip.vllm_metadata()
    facts = clip.facts
    if facts.source_fps <= 0 or not clip.frame_indices:
        raise ValueError(f"Qwen3-VL needs the source frame rate and frame numbers, got "
                         f"fps={facts.source_fps} and {len(clip.frame_indices)} indices")
    indices = [int(i) for i in clip.frame_indices]
    return {
        "fps": float(facts.source_fps),
        "duration": float(facts.duration_s),
        "total_num_frames": max(int(facts.total_frames), indices[-1] + 1),
        "frames_indices": indices,
        "video_backend": "pyav",
        "do_sample_frames": False,
    }
