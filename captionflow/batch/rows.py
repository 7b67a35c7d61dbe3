"""One DataFlow row in and out: the row as a VideoEvent, the row written back with its
caption or its error, and which rows an earlier output already captioned (resume)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from captionflow.errors import CaptionflowError, SchemaInvalidError
from captionflow.producer.sources import event_from_row
from captionflow.schemas.events import VideoEvent

ERROR_KEY = "error"


@dataclass(frozen=True, slots=True)
class RowKeys:
    """Which fields of a row hold what (DataFlow operators take these as ``input_*_key``)."""

    video: str = "video"
    image: str = "image"
    conversation: str = "conversation"
    output: str = "caption"


def row_event(row: Any, index: int, keys: RowKeys) -> VideoEvent:
    """The row as the worker's VideoEvent, through the producer's own validation."""
    if not isinstance(row, dict):
        raise SchemaInvalidError(f"row {index} is not a JSON object")
    data: dict[str, Any] = {"id": f"row-{index}", "video": row.get(keys.video)}
    if row.get(keys.image) is not None:
        data["image"] = row[keys.image]
    if row.get("options") is not None:
        # Per-row options as in a VideoEvent: prompts, json_schema, summarize, sampling...
        data["options"] = row["options"]
    conversation = row.get(keys.conversation)
    if conversation is not None:
        # Turns may carry extra fields in DataFlow files; the event needs only these two.
        data["conversation"] = [
            {"from": t.get("from"), "value": t.get("value") or ""} if isinstance(t, dict) else t
            for t in conversation] if isinstance(conversation, list) else conversation
    candidate = event_from_row(data, source=f"row {index}", id_from="field")
    if candidate.event is None:
        assert candidate.rejected is not None
        raise SchemaInvalidError(f"row {index}: {candidate.rejected.reason}")
    return candidate.event


def conversation_with_prompt(row: dict[str, Any], keys: RowKeys, prompt: str) -> list[Any]:
    """The row's conversation as DataFlow writes it back: the first human turn holds the
    prompt actually used (prepended when there is none); other turns and fields are kept."""
    turns = [dict(t) if isinstance(t, dict) else t for t in row.get(keys.conversation) or []]
    for turn in turns:
        if isinstance(turn, dict) and turn.get("from") == "human":
            turn["value"] = prompt
            return turns
    return [{"from": "human", "value": prompt}, *turns]


def captioned_row(row: dict[str, Any], keys: RowKeys, *, prompt: str, caption: str,
                  fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """The row with its caption; ``fields`` are the caption event's quality fields (status,
    generations, captions, caption_json, windows...): those that are set are written as
    ``<output>_<field>`` (``caption_status``, ``caption_json``, ``caption_windows``)."""
    out = {k: v for k, v in row.items() if k != ERROR_KEY}
    out[keys.conversation] = conversation_with_prompt(row, keys, prompt)
    out[keys.output] = caption
    for name, value in (fields or {}).items():
        if value is not None and value is not False:
            key = name if name.startswith(keys.output) else f"{keys.output}_{name}"
            out[key] = value
    return out


def failed_row(row: Any, keys: RowKeys, error: CaptionflowError) -> dict[str, Any]:
    base = dict(row) if isinstance(row, dict) else {"row": row}
    base[keys.output] = None
    base[ERROR_KEY] = {"code": error.code.value, "message": error.message}
    return base


def is_captioned(row: Any, keys: RowKeys) -> bool:
    return isinstance(row, dict) and isinstance(row.get(keys.output), str) and \
        not row.get(ERROR_KEY)


def _row_id(row: Any) -> str | int | None:
    value = row.get("id") if isinstance(row, dict) else None
    return value if isinstance(value, (str, int)) and not isinstance(value, bool) else None


def already_captioned(rows: list[Any], previous: list[Any], keys: RowKeys) -> dict[int, Any]:
    """Input row index -> the earlier output row that already holds its caption.

    A row with an ``id`` matches the earlier row with the same id; other rows match the row
    at the same position. Either way the video and the options (prompts, sampling...) must
    be the same and the earlier row must hold a caption and no error, so failed or
    unfinished rows run again, and so do rows asked something new (the caption cache then
    spares the requests an earlier run already made).
    """
    by_id = {}
    for prev in previous:
        rid = _row_id(prev)
        if rid is not None and is_captioned(prev, keys):
            by_id.setdefault(rid, prev)
    done: dict[int, Any] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            continue
        rid = _row_id(row)
        prev = by_id.get(rid) if rid is not None else (
            previous[i] if i < len(previous) else None)
        if prev is not None and is_captioned(prev, keys) and \
                prev.get(keys.video) == row.get(keys.video) and \
                prev.get("options") == row.get("options"):
            done[i] = prev
    return done


def resumed_row(row: dict[str, Any], prev: dict[str, Any], keys: RowKeys) -> dict[str, Any]:
    """The input row with the earlier run's conversation and caption (fields added to the
    input since then are kept)."""
    out = {k: v for k, v in row.items() if k != ERROR_KEY}
    out[keys.conversation] = prev.get(keys.conversation, row.get(keys.conversation))
    out[keys.output] = prev[keys.output]
    for key, value in prev.items():
        # The caption's own fields (caption_status, caption_json, captions...).
        if key.startswith(keys.output) and key not in out:
            out[key] = value
    return out
