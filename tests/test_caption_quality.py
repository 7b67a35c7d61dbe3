"""Caption status, the repetition detector and the quality gate's choices (pure logic), and
the event options that select several prompts, a JSON Schema or a summary."""

from __future__ import annotations

import pytest

from captionflow.config import Settings
from captionflow.dataflow import seed_settings
from captionflow.errors import ErrorCode, SchemaInvalidError
from captionflow.quality import (
    REPEAT_MIN_WORDS,
    better,
    caption_status,
    is_repetitive,
    parse_json,
    regeneration_sampling,
    repeated_share,
    worst,
)
from captionflow.schemas.codec import decode_video_event

NORMAL = ("A woman in a red coat walks her dog along a snowy park path at dusk. The dog "
          "stops to sniff a bench, then runs ahead toward a frozen pond where two children "
          "are skating. Streetlights come on one by one as the camera pans to the skyline.")
LOOP = "The man is walking. " * 12
CJK_LOOP = "一个男人在街上走路" * 20


def test_detector_marks_a_loop_repetitive_and_a_normal_caption_ok() -> None:
    assert is_repetitive(LOOP)
    assert caption_status(LOOP, "stop") == "repetitive"
    assert not is_repetitive(NORMAL)
    assert caption_status(NORMAL, "stop") == "ok"
    assert repeated_share(NORMAL.lower().split(), 4) < 0.1
    assert repeated_share(LOOP.lower().split(), 4) > 0.8


def test_detector_needs_enough_text_and_reads_unspaced_text_by_characters() -> None:
    short = " ".join(["go"] * (REPEAT_MIN_WORDS - 1))
    assert not is_repetitive(short)
    assert is_repetitive(CJK_LOOP)
    assert not is_repetitive("一个男人在街上走路，然后他坐在公园的长椅上看报纸。天开始下雨，他打开伞离开了。")


def test_status_order() -> None:
    assert caption_status("   ", "length") == "empty"
    assert caption_status("a cut off", "length") == "truncated"
    # A loop that ran into max_tokens was cut because it looped.
    assert caption_status(LOOP, "length") == "repetitive"
    assert caption_status('{"a": 1', "stop", json_ok=False) == "invalid_json"
    assert caption_status('{"a": 1}', "stop", json_ok=True) == "ok"
    assert better("ok", "truncated") and better("truncated", "repetitive")
    assert not better("repetitive", "repetitive")
    assert worst(["ok", "repetitive", "truncated"]) == "repetitive"
    assert worst([]) == "ok"


def test_parse_json_validates_and_ignores_text_after_the_value() -> None:
    schema = {"type": "object", "required": ["subject"],
              "properties": {"subject": {"type": "string"}}}
    assert parse_json('{"subject": "dog"}', schema) == (True, {"subject": "dog"})
    assert parse_json('{"subject": "dog"} trailing', schema) == (True, {"subject": "dog"})
    assert parse_json('{"other": 1}', schema) == (False, {"other": 1})
    assert parse_json('{"subject": "do', schema) == (False, None)


def test_regeneration_sampling_raises_penalty_and_temperature_and_moves_the_seed() -> None:
    first = regeneration_sampling({"seed": 7}, 1, base_temperature=0.0,
                                  base_repetition_penalty=1.0, repetition_penalty=1.2,
                                  temperature=0.7)
    second = regeneration_sampling({"seed": 7}, 2, base_temperature=0.0,
                                   base_repetition_penalty=1.0, repetition_penalty=1.2,
                                   temperature=0.7)
    assert first == {"seed": 8, "repetition_penalty": pytest.approx(1.2), "temperature": 0.7}
    assert second["repetition_penalty"] == pytest.approx(1.4) and second["seed"] == 9
    # A caller's higher values are kept.
    kept = regeneration_sampling({"temperature": 1.0, "repetition_penalty": 2.0}, 1,
                                 base_temperature=0.0, base_repetition_penalty=1.0,
                                 repetition_penalty=1.2, temperature=0.7)
    assert kept == {"temperature": 1.0, "repetition_penalty": 2.0}


def test_gate_is_on_in_the_service_and_off_in_the_seed_api() -> None:
    assert Settings().worker.quality_gate_retries == 2
    assert seed_settings(Settings(), {}).worker.quality_gate_retries == 0
    chosen = Settings(worker={"quality_gate_retries": 1})
    assert seed_settings(chosen, {}).worker.quality_gate_retries == 1


@pytest.mark.parametrize("options", [
    {"prompts": {}},
    {"prompts": {"short": "  "}},
    {"prompts": {"": "Describe."}},
    {"json_schema": {"type": "object"}, "json_schema_name": "scene"},
])
def test_bad_caption_options_are_schema_errors(options: dict) -> None:
    payload = ('{"id": "e1", "video": "a.mp4", "options": %s}' % __import__("json").dumps(
        options)).encode()
    with pytest.raises(SchemaInvalidError) as info:
        decode_video_event(payload, fallback_id="x", max_bytes=1 << 20)
    assert info.value.code is ErrorCode.SCHEMA_INVALID


def test_caption_options_do_not_reach_the_frame_sampler() -> None:
    event = decode_video_event(
        b'{"id": "e1", "video": "a.mp4", "options": {"prompts": {"a": "x"}, "fps": 1, '
        b'"summarize": true, "json_schema": {"type": "object"}}}',
        fallback_id="x", max_bytes=1 << 20)
    assert event.options is not None
    assert event.options.frame_overrides() == {"fps": 1}
