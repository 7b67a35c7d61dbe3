"""A fixed-latency OpenAI-compatible chat-completions server, for tests and benchmarks about
the consumer group rather than the model: it answers every request after ``latency_s`` (or
``slow_latency_s`` when the prompt contains ``[slow]``) using no CPU, and counts the
requests it received per event (the event id is the part of the ``X-Request-Id`` header
before the first ``#``, as captionflow builds it). It runs in a thread of the test process;
worker processes reach it over HTTP. Not a model: every caption is the same text."""

from __future__ import annotations

import collections
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class OpenAIStandIn:
    def __init__(self, *, latency_s: float = 0.5, slow_latency_s: float = 8.0) -> None:
        self.latency_s = latency_s
        self.slow_latency_s = slow_latency_s
        self.requests: collections.Counter[str] = collections.Counter()
        self.answered: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> OpenAIStandIn:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def handle(self) -> None:
                try:
                    super().handle()
                except OSError:
                    pass  # a worker that was killed or gave a request up mid-exchange

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": "standin"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:  # noqa: N802
                try:
                    body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                except OSError:
                    return  # the worker gave the request up while sending it
                event = (self.headers.get("X-Request-Id") or "?").split("#", 1)[0]
                with standin._lock:
                    standin.requests[event] += 1
                slow = b"[slow]" in body
                time.sleep(standin.slow_latency_s if slow else standin.latency_s)
                with standin._lock:
                    standin.answered[event] += 1
                try:
                    self._send(200, {
                            "id": "cmpl-standin", "object": "chat.completion", "model": "standin",
                        "choices": [{"index": 0, "finish_reason": "stop", "message": {
                            "role": "assistant", "content": "A person walks across a room."}}],
                        "usage": {"prompt_tokens": 64, "completion_tokens": 8}})
                except OSError:
                    pass  # the worker gave the request up (a cancelled event)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="openai-standin")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def total(self) -> int:
        with self._lock:
            return sum(self.requests.values())
