"""JSON Schema files for the events, generated from the models and shipped in the package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel

from captionflow.schemas.events import CaptionEvent, DeadLetterEvent, VideoEvent

SCHEMA_DIR = Path(__file__).parent / "json"
SCHEMAS: dict[str, type[BaseModel]] = {
    "video": VideoEvent,
    "caption": CaptionEvent,
    "dead-letter": DeadLetterEvent,
}


def generate(name: str) -> dict[str, Any]:
    schema = SCHEMAS[name].model_json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://captionflow.dev/schemas/{name}-event.v1.json"
    return schema


def path_of(name: str) -> Path:
    return SCHEMA_DIR / f"{name}-event.schema.json"


def render(name: str) -> bytes:
    return orjson.dumps(generate(name), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


def shipped(name: str) -> bytes:
    return path_of(name).read_bytes()


def write_all() -> list[Path]:
    """Regenerate the shipped files: ``python -m captionflow.schemas.jsonschema``."""
    SCHEMA_DIR.mkdir(exist_ok=True)
    written = []
    for name in SCHEMAS:
        path_of(name).write_bytes(render(name))
        written.append(path_of(name))
    return written


if __name__ == "__main__":
    for p in write_all():
        print(p)
