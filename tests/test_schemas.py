import base64

import jsonschema as jsonschema_lib
import orjson
import pytest

from captionflow.errors import (
    ErrorCode,
    MalformedJsonError,
    PayloadTooLargeError,
    SchemaInvalidError,
    VideoNotFoundError,
)
from captionflow.schemas import (
    CaptionEvent,
    TokenUsage,
    Turn,
    dead_letter,
    decode_caption_event,
    decode_dead_letter_event,
    decode_video_event,
    encode,
)
from captionflow.schemas import jsonschema as js
from captionflow.schemas.codec import now_rfc3339
from captionflow.schemas.events import SourceCoordinates, VideoEvent

SEED_ROW = {"video": ["./videos/sample1.mp4"], "conversation": [{"from": "human", "value": ""}]}


def test_seed_row_with_id_is_a_video_event() -> None:
    ev = decode_video_event(orjson.dumps({**SEED_ROW, "id": "e1"}))
    assert ev.video == ["./videos/sample1.mp4"]
    assert ev.conversation == [Turn(from_="human", value="")]
    assert ev.schema_version == 1
    assert ev.prompt("Please describe the video in detail.") == \
        "Please describe the video in detail."


def test_bare_string_video_and_defaults() -> None:
    ev = decode_video_event(b'{"id": "e", "video": "a.mp4"}')
    assert ev.video == ["a.mp4"] and ev.reference == "a.mp4"
    assert ev.conversation == [Turn(from_="human", value="")]


def test_prompt_precedence_and_conversation_written_back() -> None:
    ev = VideoEvent.model_validate({
        "id": "e", "video": "a.mp4",
        "conversation": [{"from": "system", "value": "s"}, {"from": "human", "value": "What?"}]})
    assert ev.prompt("default") == "What?"
    assert ev.conversation_with_prompt("What?")[1] == Turn(from_="human", value="What?")
    ev2 = ev.model_copy(update={"options": {"prompt": "Short caption."}})
    ev2 = VideoEvent.model_validate({**ev.model_dump(by_alias=True),
                                     "options": {"prompt": "Short caption."}})
    assert ev2.prompt("default") == "Short caption."
    empty = VideoEvent.model_validate({"id": "e", "video": "a", "conversation": []})
    assert empty.conversation_with_prompt("P") == [Turn(from_="human", value="P")]


def test_missing_id_takes_the_fallback() -> None:
    ev = decode_video_event(b'{"video": "a.mp4"}', fallback_id="topic:1:7")
    assert ev.id == "topic:1:7"
    with pytest.raises(SchemaInvalidError, match="id"):
        decode_video_event(b'{"video": "a.mp4"}')


@pytest.mark.parametrize(("raw", "error", "fragment"), [
    (b"{not json", MalformedJsonError, "not valid JSON"),
    (None, MalformedJsonError, "no value"),
    (b"[1, 2]", SchemaInvalidError, "VideoEvent"),
    (b'{"id": "e", "video": []}', SchemaInvalidError, "video"),
    (b'{"id": "e", "video": ["a", "b"]}', SchemaInvalidError, "video"),
    (b'{"id": "e", "video": "  "}', SchemaInvalidError, "blank"),
    (b'{"id": "e", "video": "a", "vidoe": 1}', SchemaInvalidError, "vidoe"),
    (b'{"id": "e", "video": "a", "options": {"fps": -1}}', SchemaInvalidError, "options.fps"),
    (b'{"id": "e", "video": "a", "schema_version": 2}', SchemaInvalidError, "schema_version"),
])
def test_bad_records_raise_typed_errors(raw: bytes | None, error: type, fragment: str) -> None:
    with pytest.raises(error) as info:
        decode_video_event(raw)
    assert fragment in info.value.message


def test_oversize_record() -> None:
    with pytest.raises(PayloadTooLargeError) as info:
        decode_video_event(b'{"id": "e", "video": "a"}' + b" " * 100, max_bytes=64)
    assert info.value.code is ErrorCode.PAYLOAD_TOO_LARGE


def test_caption_event_round_trip_uses_from_alias() -> None:
    ev = CaptionEvent(id="e", video=["a.mp4"], conversation=[Turn(from_="human", value="P")],
                      caption="A cat.", model="m", finish_reason="stop",
                      usage=TokenUsage(prompt_tokens=3, completion_tokens=2),
                      source=SourceCoordinates(topic="t", partition=1, offset=5),
                      created_at=now_rfc3339())
    raw = encode(ev)
    assert b'"from":"human"' in raw and b"null" not in raw
    assert decode_caption_event(raw) == ev


def test_dead_letter_keeps_the_raw_payload_text_or_base64() -> None:
    dl = dead_letter(b'{"id": "x1", "video": "gone.mp4"}', VideoNotFoundError("no gone.mp4"),
                     attempts=1, key=b"x1",
                     source=SourceCoordinates(topic="t", partition=0, offset=9))
    assert (dl.id, dl.error.code, dl.error.retriable) == ("x1", ErrorCode.VIDEO_NOT_FOUND, False)
    assert dl.payload == '{"id": "x1", "video": "gone.mp4"}' and dl.key == "x1"
    assert decode_dead_letter_event(encode(dl)) == dl
    binary = b"\xff\xfe\x00"
    dl2 = dead_letter(binary, MalformedJsonError("x"))
    assert dl2.payload_encoding == "base64" and base64.b64decode(dl2.payload) == binary
    assert dl2.id is None


@pytest.mark.parametrize("name", sorted(js.SCHEMAS))
def test_shipped_json_schemas_match_the_models(name: str) -> None:
    assert js.shipped(name) == js.render(name), (
        "JSON Schema drifted from the model: run python -m captionflow.schemas.jsonschema")


def test_json_schema_accepts_and_rejects_like_the_model() -> None:
    schema = orjson.loads(js.shipped("video"))
    jsonschema_lib.validate({**SEED_ROW, "id": "e"}, schema)
    jsonschema_lib.validate({"id": "e", "video": "a.mp4", "options": {"fps": 1.0}}, schema)
    with pytest.raises(jsonschema_lib.ValidationError):
        jsonschema_lib.validate({"id": "e", "video": "a.mp4", "bogus": 1}, schema)
    with pytest.raises(jsonschema_lib.ValidationError):
        jsonschema_lib.validate({"video": "a.mp4"}, schema)


def test_schema_and_docs_name_the_same_event_ceilings():
    """Every worker ceiling the shipped VideoEvent schema names is a real setting and is in
    the limits table of docs/captions.md, and the other way round."""
    import re

    from captionflow.config import setting_names
    from captionflow.schemas.jsonschema import shipped

    schema_names = set(re.findall(r"serving\.max_[a-z_]+", shipped("video").decode()))
    from pathlib import Path

    docs = (Path(__file__).parents[1] / "docs" / "captions.md").read_text()
    section = docs.split("## Limits a producer cannot lift", 1)[1].split("\n## ", 1)[0]
    docs_names = set(re.findall(r"`(serving\.max_[a-z_]+)`", section))
    assert {"serving.max_tokens", "serving.max_prompts_per_event",
            "serving.max_json_schema_bytes",
            "serving.max_completion_tokens_per_event"} <= schema_names
    assert schema_names <= setting_names()
    assert schema_names == docs_names
