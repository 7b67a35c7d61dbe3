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


def video_metadata(clip: Clip) -> dict[str, Any]:
    """Metadata for the ``(frames, metadata)`` tuple: :meth:`Clip.vllm_metadata`."""
    return clip.vllm_metadata()
