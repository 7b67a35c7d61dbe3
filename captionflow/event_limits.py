"""The worker's ceilings on what one event may ask for, whatever its producer wrote.

A producer the operator does not control must not make one event cost more than the
operator allows. Each per-event option meets one rule (docs/captions.md, "Limits"):

- ``options.sampling.max_tokens``: clamped to ``serving.max_tokens`` per request (the
  worker's default is also its ceiling; an event may ask for fewer).
- ``options.prompts``: more than ``serving.max_prompts_per_event`` is refused
  (``invalid_request``): dropping prompts would silently lose captions the producer named.
- ``options.json_schema``: a schema above ``serving.max_json_schema_bytes`` (as compact
  JSON) is refused; the engine compiles every schema it is given into a grammar.
- The event's completion tokens in all: its first requests (one per prompt and window, plus
  a summary per prompt) at their clamped ``max_tokens`` must fit in
  ``serving.max_completion_tokens_per_event``, or the event is refused before any request;
  quality-gate retries spend only what that leaves (:class:`TokenBudget`).
- Frames and pixels are clamped by the sampling policy (``captionflow.video.sampling``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from captionflow.config import ServingSettings
from captionflow.errors import InvalidRequestError


def clamp_sampling(sampling: Mapping[str, Any], serving: ServingSettings) -> dict[str, Any]:
    """The event's sampling overrides with ``max_tokens`` set and within the ceiling."""
    out = dict(sampling)
    asked = out.get("max_tokens")
    out["max_tokens"] = serving.max_tokens if asked is None else min(int(asked),
                                                                     serving.max_tokens)
    return out


def check_prompt_count(count: int, serving: ServingSettings) -> None:
    if count > serving.max_prompts_per_event:
        raise InvalidRequestError(
            f"the event names {count} prompts; serving.max_prompts_per_event allows "
            f"{serving.max_prompts_per_event}: send fewer prompts or split the event")


def check_schema_size(schema: Mapping[str, Any], serving: ServingSettings) -> None:
    size = len(orjson.dumps(schema))
    if size > serving.max_json_schema_bytes:
        raise InvalidRequestError(
            f"options.json_schema is {size} bytes as compact JSON; "
            f"serving.max_json_schema_bytes allows {serving.max_json_schema_bytes}: send a "
            "smaller schema, or name one of the worker's serving.json_schemas instead")


class TokenBudget:
    """Completion tokens one event may spend. The first request of every caption is
    reserved up front (``first_requests`` of ``per_request`` tokens each, refused when they
    do not fit); a quality-gate retry is asked only when the spare, which grows by what
    finished requests left unused, covers a whole request. So the event's completion
    tokens never pass ``limit`` as long as the engine honours ``max_tokens``."""

    def __init__(self, *, limit: int, per_request: int, first_requests: int) -> None:
        self.limit = limit
        self.per_request = per_request
        self.spare = limit - per_request * first_requests
        if self.spare < 0:
            raise InvalidRequestError(
                f"the event needs {first_requests} caption requests (prompts x windows, plus "
                f"a summary per prompt) of up to {per_request} tokens: "
                f"{first_requests * per_request} tokens, over "
                f"serving.max_completion_tokens_per_event={limit}; ask fewer prompts, a "
                "shorter range (start_s/end_s) or fewer options.sampling.max_tokens")

    def take_retry(self) -> bool:
        """Reserve one more request for the quality gate, if the spare covers it."""
        if self.spare < self.per_request:
            return False
        self.spare -= self.per_request
        return True

    def settle(self, completion_tokens: int) -> None:
        """Give back what a finished request (first or retry) did not use."""
        self.spare += max(0, self.per_request - completion_tokens)
