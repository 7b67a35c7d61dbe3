"""The event contract: what goes into the input topic and what comes out.

Input rows are DataFlow-MM compatible (``video``, ``conversation``, optional ``image``).
JSON Schema files generated from these models ship in ``captionflow/schemas/json`` for
producers written in other languages.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from captionflow.errors import ErrorCode

SCHEMA_VERSION = 1


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class Turn(_Model):
    """One DataFlow conversation turn: ``{"from": "human", "value": "..."}``."""

    from_: str = Field(alias="from", min_length=1, examples=["human"])
    value: str = ""


class SamplingOptions(_Model):
    """Per-event overrides of the generation settings."""

    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = None
    max_tokens: int | None = Field(None, ge=1, description=(
        "Completion tokens per request; clamped to the worker's serving.max_tokens. The "
        "event's requests in all (prompts x windows, summaries, quality-gate retries) stay "
        "within serving.max_completion_tokens_per_event: an event whose first requests "
        "cannot fit is refused (invalid_request)."))
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = None


# Prompt names become keys of `captions`; several prompts share one fetch and decode.
MAX_PROMPTS = 16
_PromptName = Annotated[str, StringConstraints(min_length=1, max_length=64)]
CaptionStatus = Literal["ok", "truncated", "repetitive", "empty", "invalid_json"]
_STATUS_DOC = ("ok; truncated (finish_reason length); repetitive (the n-gram repetition "
               "detector); empty; invalid_json (a structured caption that does not parse or "
               "validate against its schema). See docs/captions.md.")


class EventOptions(_Model):
    # One line in the shipped JSON Schema (a docstring would carry its line breaks).
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True,
                              json_schema_extra={"description": (
        "Per-event overrides, within the worker's limits: frame and pixel options and "
        "sampling.max_tokens are clamped to them; more prompts than "
        "serving.max_prompts_per_event, a json_schema above serving.max_json_schema_bytes, "
        "or an event whose requests cannot fit serving.max_completion_tokens_per_event are "
        "refused (invalid_request). See docs/captions.md, \"Limits a producer cannot "
        "lift\".")})

    prompt: str | None = Field(None, description="Overrides the conversation's human turn.")
    fps: float | None = Field(None, gt=0)
    nframes: int | None = Field(None, ge=2)
    min_frames: int | None = Field(None, ge=1)
    max_frames: int | None = Field(None, ge=2)
    min_pixels: int | None = Field(None, gt=0)
    max_pixels: int | None = Field(None, gt=0)
    total_pixels: int | None = Field(None, gt=0)
    start_s: float | None = Field(None, ge=0)
    end_s: float | None = Field(None, gt=0)
    sampling: SamplingOptions | None = None
    prompts: dict[_PromptName, str] | None = Field(
        None, min_length=1, max_length=MAX_PROMPTS, description=(
            "Several named prompts on one decode: the caption event's `captions` holds one "
            "caption per name, and `caption` the first one's. Overrides `prompt`. More than "
            "the worker's serving.max_prompts_per_event is refused (invalid_request)."))
    json_schema: dict[str, Any] | None = Field(None, description=(
        "A JSON Schema that constrains the caption (structured outputs); the caption event "
        "carries the parsed object in `caption_json`. Above the worker's "
        "serving.max_json_schema_bytes (compact JSON) it is refused (invalid_request)."))
    json_schema_name: str | None = Field(None, min_length=1, description=(
        "The name of a schema from the worker's serving.json_schemas setting."))
    summarize: bool | None = Field(None, description=(
        "For windowed videos: one more text-only request turns the window captions into "
        "one caption (default: serving.summarize_windows)."))
    cache: bool | None = Field(None, description=(
        "false: neither look this event's captions up in the caption cache nor store them "
        "(docs/captions.md)."))

    @field_validator("prompts")
    @classmethod
    def _prompts_non_blank(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and any(not text.strip() for text in value.values()):
            raise ValueError("prompts must not be blank")
        return value

    @model_validator(mode="after")
    def _one_schema(self) -> EventOptions:
        if self.json_schema is not None and self.json_schema_name is not None:
            raise ValueError("give json_schema or json_schema_name, not both")
        return self

    def frame_overrides(self) -> dict[str, Any]:
        return self.model_dump(exclude=_NOT_FRAME_OPTIONS, exclude_none=True)


_NOT_FRAME_OPTIONS = {"prompt", "sampling", "prompts", "json_schema", "json_schema_name",
                      "summarize", "cache"}


# A bare string is accepted on input and stored as a one-element list.
_OneVideo = Annotated[list[str], WithJsonSchema({
    "anyOf": [{"type": "string", "minLength": 1},
              {"type": "array", "items": {"type": "string", "minLength": 1},
               "minItems": 1, "maxItems": 1}],
    "description": "One video reference (DataFlow rows hold a one-element list; a bare string "
                   "is accepted): a path under the worker's allowed roots, file://, http(s)://"})]
_Images = Annotated[list[str] | None, WithJsonSchema({
    "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}},
              {"type": "null"}],
    "description": "DataFlow's optional image field; carried through to the caption event."})]


def _default_conversation() -> list[Turn]:
    return [Turn(from_="human", value="")]


class VideoEvent(_Model):
    """A request to caption one video."""

    schema_version: Literal[1] = SCHEMA_VERSION
    id: str = Field(min_length=1, max_length=256,
                    description="Idempotency key; caption and dead-letter events carry it.")
    video: _OneVideo = Field(min_length=1, max_length=1)
    image: _Images = None
    conversation: list[Turn] = Field(default_factory=_default_conversation)
    options: EventOptions | None = None
    metadata: dict[str, Any] = Field(default_factory=dict,
                                     description="Opaque; copied into the caption event.")

    @field_validator("video", "image", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("video")
    @classmethod
    def _non_blank(cls, value: list[str]) -> list[str]:
        if any(not ref.strip() for ref in value):
            raise ValueError("video references must not be blank")
        return value

    @property
    def reference(self) -> str:
        return self.video[0]

    def prompt(self, default_prompt: str) -> str:
        """The user text: the options' prompt, else the first human turn, else the default."""
        if self.options is not None and self.options.prompt:
            return self.options.prompt
        for turn in self.conversation:
            if turn.from_ == "human" and turn.value.strip():
                return turn.value
        return default_prompt

    def conversation_with_prompt(self, prompt: str) -> list[Turn]:
        """The conversation as DataFlow writes it back: the first human turn holds the prompt
        actually used."""
        turns = list(self.conversation)
        for i, turn in enumerate(turns):
            if turn.from_ == "human":
                turns[i] = Turn(from_="human", value=prompt)
                return turns
        return [Turn(from_="human", value=prompt), *turns]


class SourceCoordinates(_Model):
    topic: str
    partition: int
    offset: int


class TokenUsage(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class VideoInfo(_Model):
    """Facts about the source video and what was sampled from it."""

    duration_s: float
    source_fps: float
    total_frames: int
    width: int
    height: int
    codec: str
    rotation_deg: int = 0
    frames_sampled: int
    sample_fps: float
    frame_width: int
    frame_height: int
    bytes_read: int | None = Field(
        None, description="Bytes fetched over the network for this video (object-store "
        "ranges or a download); absent for local files.")
    decode_device: str | None = Field(
        None, description="Where the sampled frames were decoded: \"cpu\", or the GPU "
        "(\"cuda\", \"cuda:N\") named by video.decode_device.")


class StageTimings(_Model):
    fetch_decode_ms: float = 0.0
    queue_ms: float = 0.0
    inference_ms: float = 0.0
    total_ms: float = 0.0


class WindowCaption(_Model):
    """A caption of one window of a long video (dense captions)."""

    index: int
    start_s: float
    end_s: float
    caption: str
    finish_reason: str
    usage: TokenUsage
    status: CaptionStatus = Field("ok", description=_STATUS_DOC)
    generations: int = Field(1, description=(
        "Engine requests made for this window's caption: 1, plus the quality gate's."))
    captions: dict[str, str] | None = Field(
        None, description="One caption per named prompt (options.prompts).")
    caption_json: Any = Field(None, description="The caption parsed, with options.json_schema.")
    cache_hit: bool | None = Field(None, description=(
        "True when this window's captions came from the caption cache (the window was not "
        "decoded nor sent to the engine); absent when the cache was not used."))


class CacheInfo(_Model):
    """How the caption cache served this event (docs/captions.md)."""

    hit: bool = Field(description=(
        "True when every caption of the event came from the cache (no engine request)."))
    key: str = Field(description=(
        "The cache key of the event's caption; for windows joined without a summary, "
        "the sha256 of the windows' keys, in order."))
    hits: int = Field(0, description="Captions (windows x prompts, summaries) from the cache.")
    lookups: int = Field(0, description="Captions looked up in the cache.")


class CaptionEvent(_Model):
    """The caption of one video event, keyed by the event id."""

    schema_version: Literal[1] = SCHEMA_VERSION
    id: str
    video: list[str]
    image: list[str] | None = None
    conversation: list[Turn]
    caption: str
    model: str
    finish_reason: str
    usage: TokenUsage
    video_info: VideoInfo | None = None
    windows: list[WindowCaption] | None = None
    status: CaptionStatus = Field("ok", description=_STATUS_DOC + (
        " For a windowed video without a summary: the worst window's."))
    generations: int = Field(1, description=(
        "Engine requests made for this event's captions (one per prompt and window, plus "
        "summaries), the quality gate's included."))
    captions: dict[str, str] | None = Field(None, description=(
        "One caption per named prompt (options.prompts); `caption` is the first one's."))
    captions_status: dict[str, CaptionStatus] | None = Field(
        None, description="The status of each caption in `captions`.")
    caption_json: Any = Field(None, description=(
        "With options.json_schema: the caption parsed (the first prompt's; for a windowed "
        "video, the summary's, or none without a summary: see the windows)."))
    summarized: bool = Field(False, description=(
        "True when `caption` is a summary of the window captions (options.summarize)."))
    cache: CacheInfo | None = Field(None, description=(
        "Present when the caption cache was used for this event."))
    timings: StageTimings = StageTimings()
    metadata: dict[str, Any] = Field(default_factory=dict)
    source: SourceCoordinates | None = None
    attempts: int = 1
    worker: str | None = None
    created_at: str = Field(description="RFC 3339 UTC time the caption was made.")
    dropped_fields: list[str] | None = Field(None, description=(
        "Echoed input fields left out so that the event fits the producer's size limit "
        "(metadata, then image, then the conversation, then the window captions); the "
        "caption itself is never dropped."))


class ErrorInfo(_Model):
    code: ErrorCode
    message: str
    retriable: bool
    attempts: int = 1


class DeadLetterEvent(_Model):
    """A record that could not be captioned, with why, and the raw payload to replay it."""

    schema_version: Literal[1] = SCHEMA_VERSION
    id: str | None = Field(None, description="The event id, when the payload had a usable one.")
    error: ErrorInfo
    payload: str = Field(description=(
        "The raw record value, as text or base64 (see encoding); at most a prefix of "
        "worker.dead_letter_payload_max_bytes bytes when payload_truncated."))
    payload_encoding: Literal["utf-8", "base64"] = "utf-8"
    payload_size_bytes: int | None = Field(
        None, description="Size of the whole raw record value, in bytes.")
    payload_sha256: str | None = Field(
        None, description="Hex sha256 of the whole raw record value.")
    payload_truncated: bool = Field(
        False, description="True when payload holds only a prefix of the record value.")
    key: str | None = None
    source: SourceCoordinates | None = None
    worker: str | None = None
    created_at: str
