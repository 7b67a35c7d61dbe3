"""Caption quality: the status of one generated caption, the n-gram repetition detector, and
the quality gate's choices (which captions to ask for again, with what sampling, and which
attempt to keep). Pure functions; ``captioning.py`` runs the gate.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

CaptionStatus = Literal["ok", "truncated", "repetitive", "empty", "invalid_json"]
STATUSES: tuple[CaptionStatus, ...] = ("ok", "truncated", "repetitive", "empty", "invalid_json")
# The gate asks again for these; an empty caption is the model's answer, not a sampling
# accident, and is kept as is.
REGENERATE: frozenset[str] = frozenset({"truncated", "repetitive", "invalid_json"})
# Which attempt the gate keeps: the lowest rank, the earliest among equals.
_RANK = {"ok": 0, "truncated": 1, "invalid_json": 2, "repetitive": 3, "empty": 4}

# The repetition detector (docs/captions.md): a text is repetitive when at least
# REPEAT_MIN_SHARE of its word n-grams (n = REPEAT_NGRAM_WORDS) repeat an earlier one, and it
# has at least REPEAT_MIN_WORDS words. Text with few spaces (Chinese, Japanese, or a run-on
# token loop) is measured in character n-grams instead (n = REPEAT_NGRAM_CHARS, at least
# REPEAT_MIN_CHARS characters). A normal caption of a few hundred words repeats well under
# 10% of its 4-grams; a looping one repeats nearly all of them.
REPEAT_NGRAM_WORDS = 4
REPEAT_MIN_WORDS = 16
REPEAT_NGRAM_CHARS = 12
REPEAT_MIN_CHARS = 96
REPEAT_MIN_SHARE = 0.5


def repeated_share(units: list[str] | str, n: int) -> float:
    """The share of the n-grams of ``units`` that repeat an earlier n-gram (0 when there are
    fewer than ``n`` units)."""
    total = len(units) - n + 1
    if total <= 0:
        return 0.0
    grams = {tuple(units[i:i + n]) for i in range(total)}
    return 1.0 - len(grams) / total


def is_repetitive(text: str) -> bool:
    words = text.lower().split()
    if len(words) >= REPEAT_MIN_WORDS:
        return repeated_share(words, REPEAT_NGRAM_WORDS) >= REPEAT_MIN_SHARE
    compact = "".join(words)
    if len(compact) >= REPEAT_MIN_CHARS:
        return repeated_share(compact, REPEAT_NGRAM_CHARS) >= REPEAT_MIN_SHARE
    return False


def parse_json(text: str, schema: Mapping[str, Any] | None) -> tuple[bool, Any]:
    """``(valid, value)``: the text as one JSON value that validates against ``schema``.
    Text after the value (an engine that ran past the closing brace) is ignored, so the
    value is what constrained decoding produced. Raw control characters inside strings,
    which the grammar lets through, are accepted (:func:`canonical_json` escapes them)."""
    import jsonschema

    try:
        value, _ = json.JSONDecoder(strict=False).raw_decode(text.strip())
    except ValueError:
        return False, None
    if schema is not None:
        try:
            jsonschema.validate(value, schema)
        except jsonschema.ValidationError:
            return False, value
        except jsonschema.SchemaError:
            # The engine compiled it; whether it is valid JSON Schema is not the caption's
            # fault, so the parsed value stands.
            return True, value
    return True, value


def canonical_json(value: Any) -> str:
    """A structured caption's text: its value as compact JSON, control characters escaped,
    so that any strict JSON parser reads it."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def caption_status(text: str, finish_reason: str, *, json_ok: bool | None = None
                   ) -> CaptionStatus:
    """``empty`` (nothing but whitespace), ``repetitive`` (the detector), ``truncated``
    (finish_reason ``length``), ``invalid_json`` (a structured caption that does not parse or
    validate), else ``ok``. A caption that loops until max_tokens is ``repetitive``: that is
    why it was cut."""
    if not text.strip():
        return "empty"
    if is_repetitive(text):
        return "repetitive"
    if finish_reason == "length":
        return "truncated"
    if json_ok is False:
        return "invalid_json"
    return "ok"


def better(a: CaptionStatus, b: CaptionStatus) -> bool:
    """Whether a caption with status ``a`` beats one with status ``b``."""
    return _RANK[a] < _RANK[b]


def worst(statuses: list[CaptionStatus]) -> CaptionStatus:
    return max(statuses, key=lambda s: _RANK[s]) if statuses else "ok"


def regeneration_sampling(sampling: Mapping[str, Any], retry: int, *, base_temperature: float,
                          base_repetition_penalty: float, repetition_penalty: float,
                          temperature: float) -> dict[str, Any]:
    """Sampling for the gate's ``retry``-th request (1-based): the repetition penalty raised
    a step per retry, at least ``temperature`` (a greedy loop repeats itself), and a seeded
    request gets another seed (the same seed would give the same text)."""
    out = dict(sampling)
    current_rp = float(out.get("repetition_penalty", base_repetition_penalty))
    out["repetition_penalty"] = max(current_rp, 1.0 + (repetition_penalty - 1.0) * retry)
    out["temperature"] = max(float(out.get("temperature", base_temperature)), temperature)
    if out.get("seed") is not None:
        out["seed"] = int(out["seed"]) + retry
    return out
