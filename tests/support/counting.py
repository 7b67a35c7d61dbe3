"""Engine request counters for the caption cache's tests.

``CountingBackend`` wraps a started backend (the shared vLLM CPU engine) and counts the
caption requests that reach it. ``OpenAIStandIn`` is an OpenAI-compatible HTTP front
(``/v1/models``, ``/v1/chat/completions``) for worker *processes* (``serving.backend =
"openai"``): it decodes each request's inline PNG frames and prompt back into a
``CaptionRequest`` and hands it to the shared engine, counting requests by the worker's
``X-Request-Id`` (which starts with the event id). What is counted is what reached the
real engine: no caption is invented here."""

from __future__ import annotations

import asyncio
import base64
import collections
import io
import socket
from typing import Any

import numpy as np
from PIL import Image

from captionflow.serving.base import CaptionBackend, CaptionRequest, CaptionResult
from captionflow.video.clip import Clip, VideoFacts


class CountingBackend(CaptionBackend):
    name = "counting"

    def __init__(self, inner: CaptionBackend) -> None:
        self.inner = inner
        self.requests: list[str] = []

    async def start(self) -> None:  # the shared engine is started and closed by its fixture
        pass

    async def close(self) -> None:
        pass

    async def caption(self, request: CaptionRequest) -> CaptionResult:
        self.requests.append(request.request_id)
        return await self.inner.caption(request)

    async def healthy(self) -> bool:
        return await self.inner.healthy()

    def model_info(self) -> dict[str, Any]:
        return self.inner.model_info()


def _frames(url: str) -> np.ndarray:
    payload = url.split(",", 1)[1]
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(part))).convert("RGB"))
                     for part in payload.split(",")])


def request_from_body(request_id: str, body: dict[str, Any]) -> CaptionRequest:
    user = next(m for m in body["messages"] if m["role"] == "user")
    prompt = next(p["text"] for p in user["content"] if p["type"] == "text")
    video = next((p for p in user["content"] if p["type"] == "video_url"), None)
    clip = None
    if video is not None:
        frames = _frames(video["video_url"]["url"])
        fps = float(body["media_io_kwargs"]["video"]["fps"])
        n, h, w = frames.shape[:3]
        clip = Clip(frames=frames, frame_indices=tuple(range(n)),
                    timestamps_s=tuple(i / fps for i in range(n)), sample_fps=fps,
                    facts=VideoFacts(duration_s=n / fps, source_fps=fps, total_frames=n,
                                     width=w, height=h, codec="png"))
    sampling = {k: body[k] for k in ("max_tokens", "temperature", "top_p", "top_k",
                                     "repetition_penalty", "seed") if k in body}
    return CaptionRequest(request_id, clip, prompt, sampling)


class OpenAIStandIn:
    """Serve on a free loopback port from the running event loop (``await start()``)."""

    def __init__(self, engine: CaptionBackend, model: str) -> None:
        self.engine = engine
        self.model = model
        self.requests: list[str] = []
        self.delay_s = 0.0  # added before each answer, to pace a test
        self.port = 0
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def by_event(self) -> collections.Counter[str]:
        return collections.Counter(r.split("#", 1)[0] for r in self.requests)

    async def start(self) -> None:
        import uvicorn
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        async def models(_: Request) -> JSONResponse:
            return JSONResponse({"object": "list", "data": [{"id": self.model}]})

        async def chat(request: Request) -> JSONResponse:
            body = await request.json()
            rid = request.headers.get("x-request-id", "")
            self.requests.append(rid)
            result = await self.engine.caption(request_from_body(rid, body))
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            return JSONResponse({
                "id": rid, "object": "chat.completion", "model": self.model,
                "choices": [{"index": 0, "finish_reason": result.finish_reason,
                             "message": {"role": "assistant", "content": result.text}}],
                "usage": {"prompt_tokens": result.prompt_tokens,
                          "completion_tokens": result.completion_tokens}})

        app = Starlette(routes=[Route("/v1/models", models),
                                Route("/v1/chat/completions", chat, methods=["POST"])])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                     log_level="warning", lifespan="off"))
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            await asyncio.wait_for(self._task, 10)
