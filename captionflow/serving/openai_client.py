"""A remote OpenAI-compatible chat-completions server (``vllm serve``) as the backend, so
decode-heavy CPU workers and GPU servers scale apart.

Frames travel inline, as the sampled frames themselves (lossless PNG frames in vLLM's
``video/jpeg`` frame-sequence data URL, with the frame count and sampling fps in
per-request ``media_io_kwargs``), the transport whose greedy tokens were checked equal to
the in-process engine's against a real vLLM 0.32 server. The server never fetches a video
itself: that would bypass the worker's fetch guards and sampling. vLLM 0.32 refuses per-request
``media_io_kwargs`` unless the server runs with ``--trust-request-mm-kwargs``; that refusal
is a fatal configuration error here, saying so. One call is one POST by default: the
worker's retry layer (``worker.max_attempts``, with the dependency gate) retries it, and
``serving.openai_max_retries`` adds jittered retries inside one attempt for 5xx and
connection errors (docs/errors.md gives the total). Concurrency is bounded; every error
ends as a typed captionflow error. A server that is unreachable or restarting (5xx, 503)
raises a dependency error; one that is overloaded (429, its Retry-After capped by
``serving.retry_after_max_s``) or refuses this worker's key (401/403) raises one that the
worker never charges to the record: it pauses and probes ``/models`` until the server
answers, so neither a restart nor an overload turns the backlog into dead letters.
An event's images go before the video as lossless PNG ``image_url`` data URLs (the server's
``--limit-mm-per-prompt`` must allow them).
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import random
import time
from typing import Any

import httpx
import numpy as np

from captionflow.config import ServingSettings
from captionflow.errors import (
    CaptionflowError,
    DependencyState,
    EngineDeadError,
    EngineOverloadedError,
    EngineRequestFailedError,
    EngineTimeoutError,
    EngineUnavailableError,
    InvalidRequestError,
    PromptTooLongError,
)
from captionflow.serving.base import (
    CaptionBackend,
    CaptionRequest,
    CaptionResult,
    EngineCapacity,
    EngineLoad,
)
from captionflow.serving.prompt import build_messages
from captionflow.serving.vllm_engine import sampling_values
from captionflow.video.clip import Clip

log = logging.getLogger(__name__)

_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_REFUSED_STATUS = frozenset({401, 403})
_STATE_BY_STATUS = {200: DependencyState.UP, 429: DependencyState.OVERLOADED,
                    401: DependencyState.MISCONFIGURED, 403: DependencyState.MISCONFIGURED}
_TOO_LONG_MARKERS = ("maximum model length", "maximum context length", "too long")
# vLLM 0.32's answer when the server was started without --trust-request-mm-kwargs.
_UNTRUSTED_MM_KWARGS_MARKER = "--trust-request-mm-kwargs"


def frames_data_url(clip: Clip) -> str:
    """The clip's frames as one ``data:video/jpeg;base64,...`` URL of comma-separated
    frames. vLLM reads each part with PIL, so PNG parts keep the pixels exact."""
    from PIL import Image

    parts = []
    for frame in clip.frames:
        buf = io.BytesIO()
        Image.fromarray(frame, mode="RGB").save(buf, format="PNG", compress_level=1)
        parts.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return "data:video/jpeg;base64," + ",".join(parts)


def image_data_url(image: np.ndarray) -> str:
    """One image as a lossless ``data:image/png;base64,...`` URL."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class OpenAIBackend(CaptionBackend):
    name = "openai"

    def __init__(self, settings: ServingSettings, *,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        self._transport = transport
        self._http: httpx.AsyncClient | None = None
        self._slots = asyncio.Semaphore(settings.openai_max_concurrency)
        # This worker's requests at the server, and waiting here for one of its slots.
        self._at_server = 0
        self._waiting = 0

    @property
    def model_name(self) -> str:
        return self.settings.served_model_name or self.settings.model

    async def start(self) -> None:
        if self._http is not None:
            return
        headers = {}
        if self.settings.openai_api_key is not None:
            headers["Authorization"] = f"Bearer {self.settings.openai_api_key.get_secret_value()}"
        timeout = httpx.Timeout(self.settings.openai_timeout_s,
                                connect=min(10.0, self.settings.openai_timeout_s))
        self._http = httpx.AsyncClient(
            base_url=self.settings.openai_base_url.rstrip("/") + "/", headers=headers,
            timeout=timeout, transport=self._transport)

    async def close(self) -> None:
        client, self._http = self._http, None
        if client is not None:
            await client.aclose()

    async def healthy(self) -> bool:
        return await self.health_state() is DependencyState.UP

    async def health_state(self) -> DependencyState:
        """``GET /models``: 200 up, 429 overloaded, 401/403 misconfigured (the server
        refuses serving.openai_api_key), anything else down."""
        if self._http is None:
            return DependencyState.DOWN
        try:
            response = await self._http.get("models", timeout=5.0)
        except httpx.HTTPError:
            return DependencyState.DOWN
        return _STATE_BY_STATUS.get(response.status_code, DependencyState.DOWN)

    def capacity(self) -> EngineCapacity:
        return EngineCapacity(self.settings.openai_max_concurrency,
                              "serving.openai_max_concurrency")

    def load(self) -> EngineLoad:
        """This worker's share: requests at the server (its own split into running and
        waiting is on the server's /metrics) and requests waiting here for a slot."""
        return EngineLoad(running=self._at_server, waiting=self._waiting)

    def model_info(self) -> dict[str, Any]:
        return {"model": self.model_name, "backend": self.name,
                "base_url": self.settings.openai_base_url}

    def request_body(self, request: CaptionRequest) -> dict[str, Any]:
        """The chat-completions body for one request (vLLM extensions included)."""
        values = sampling_values(self.settings, dict(request.sampling))
        clip = request.clip
        media_io: dict[str, Any] = {}
        video_part: dict[str, Any] | None = None
        if clip is not None:
            video_part = {"type": "video_url", "video_url": {"url": frames_data_url(clip)}}
            # Frame count and rate of what we send, so the server neither drops frames
            # (its default keeps 32) nor guesses the rate that drives the temporal ids.
            media_io = {"video": {"num_frames": clip.num_frames, "fps": float(clip.sample_fps)}}
        image_parts = [{"type": "image_url", "image_url": {"url": image_data_url(image)}}
                       for image in request.images]
        body: dict[str, Any] = {
            "model": self.model_name,
            "messages": build_messages(request.prompt, system_prompt=self.settings.system_prompt,
                                       default_prompt=self.settings.default_prompt,
                                       video_part=video_part, image_parts=image_parts,
                                       video=clip is not None),
            "max_tokens": int(values["max_tokens"]),
            "temperature": float(values["temperature"]),
            "top_p": float(values["top_p"]),
            "top_k": int(values["top_k"]),
            "repetition_penalty": float(values["repetition_penalty"]),
            "return_token_ids": True,
        }
        if values["seed"] is not None:
            body["seed"] = int(values["seed"])
        if media_io:
            body["media_io_kwargs"] = media_io
        if request.json_schema is not None:
            # The server compiles the schema; one it cannot is an HTTP 400 (invalid_request).
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "caption", "schema": dict(request.json_schema), "strict": True}}
        return body

    async def caption(self, request: CaptionRequest) -> CaptionResult:
        if self._http is None:
            raise EngineDeadError("the openai backend is not started; call start() first")
        # PNG-encoding the frames and images is CPU work: keep it off the event loop.
        body = await asyncio.to_thread(self.request_body, request)
        queued = time.perf_counter()
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        self._at_server += 1
        try:
            started = time.perf_counter()
            data = await self._post_with_retries(request.request_id, body)
        finally:
            self._at_server -= 1
            self._slots.release()
        done = time.perf_counter()
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
            usage = data.get("usage") or {}
            token_ids = tuple(choice.get("token_ids") or ())
            prompt_ids = tuple(data.get("prompt_token_ids") or ())
            return CaptionResult(
                request_id=request.request_id, text=text,
                finish_reason=str(choice.get("finish_reason") or "stop"),
                prompt_tokens=int(usage.get("prompt_tokens", len(prompt_ids))),
                completion_tokens=int(usage.get("completion_tokens", len(token_ids))),
                token_ids=token_ids, queue_ms=(started - queued) * 1000.0,
                inference_ms=(done - started) * 1000.0, prompt_token_ids=prompt_ids)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise EngineRequestFailedError(
                f"request {request.request_id}: unexpected response from "
                f"{self.settings.openai_base_url}: {str(data)[:300]}") from e

    async def _post_with_retries(self, request_id: str, body: dict[str, Any]) -> dict[str, Any]:
        assert self._http is not None
        attempts = self.settings.openai_max_retries + 1
        last: CaptionflowError | None = None
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(self._backoff_s(attempt, last))
            try:
                response = await self._http.post(
                    "chat/completions", json=body, headers={"X-Request-Id": request_id})
            except httpx.TimeoutException as e:
                last = EngineTimeoutError(
                    f"request {request_id}: no answer from {self.settings.openai_base_url} "
                    f"within serving.openai_timeout_s={self.settings.openai_timeout_s}")
                last.__cause__ = e
                continue
            except httpx.TransportError as e:
                last = EngineUnavailableError(
                    f"request {request_id}: cannot reach {self.settings.openai_base_url} "
                    f"({type(e).__name__}: {e}); check serving.openai_base_url")
                last.__cause__ = e
                continue
            if response.status_code == 200:
                return response.json()
            last = self._status_error(request_id, response)
            if response.status_code not in _RETRY_STATUS or \
                    getattr(last, "retry_after_s", None) is not None:
                # A Retry-After is the worker's to honour (it pauses for it), not ours.
                raise last
            log.warning("request %s: %s answered %d (attempt %d/%d)", request_id,
                        self.settings.openai_base_url, response.status_code, attempt + 1,
                        attempts)
        assert last is not None
        raise last

    def _backoff_s(self, attempt: int, last: CaptionflowError | None) -> float:
        base_s = self.settings.openai_retry_backoff_ms / 1000.0
        retry_after = getattr(last, "retry_after_s", None)
        # Jittered, so workers that failed together do not retry together.
        delay = base_s * (2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
        return max(delay, retry_after) if retry_after is not None else delay

    def _status_error(self, request_id: str, response: httpx.Response) -> CaptionflowError:
        status = response.status_code
        detail = _error_message(response)
        where = f"request {request_id}: {self.settings.openai_base_url} answered {status}"
        if status == 429:
            retry_after = response.headers.get("retry-after")
            hint = None
            if retry_after and retry_after.replace(".", "", 1).isdigit():
                # A hostile or confused server must not park the worker for hours.
                hint = min(float(retry_after), self.settings.retry_after_max_s)
            return EngineOverloadedError(f"{where} (overloaded): {detail}", retry_after_s=hint)
        if status in _REFUSED_STATUS:
            # Every request would be refused alike: the worker's settings, not the record.
            return EngineUnavailableError(
                f"{where}: {detail} - the server refuses this worker: check "
                "serving.openai_api_key and serving.openai_base_url",
                state=DependencyState.MISCONFIGURED)
        if status == 404:
            return EngineDeadError(
                f"{where}: {detail} - check serving.openai_base_url, serving.openai_api_key and "
                f"serving.served_model_name (sent model={self.model_name!r})")
        if status == 400 and _UNTRUSTED_MM_KWARGS_MARKER in detail:
            # Every frames request would fail the same way: a deployment mistake.
            return EngineDeadError(
                f"{where}: {detail} - the openai backend sends each clip's frame count and "
                "sampling rate as media_io_kwargs (serving.openai_video_transport='frames'): "
                "start the vLLM server with --trust-request-mm-kwargs "
                "(engine_setup.vllm_server_command does)")
        if status == 408:
            return EngineTimeoutError(f"{where}: {detail}")
        if 400 <= status < 500:
            if any(marker in detail.lower() for marker in _TOO_LONG_MARKERS):
                return PromptTooLongError(f"{where}: {detail}")
            return InvalidRequestError(f"{where}: {detail}")
        if status in _RETRY_STATUS:
            return EngineUnavailableError(f"{where}: {detail}")
        return EngineRequestFailedError(f"{where}: {detail}")


def _error_message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:500]
    error = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, dict):
        return str(error.get("message") or error)[:500]
    return str(error)[:500]
