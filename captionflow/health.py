"""HTTP endpoints of a service (the worker, the sink): /metrics, /healthz (liveness) and
/readyz (readiness).
/metrics is left out (404) when the worker runs with metrics.enabled=false; the probes never.

Served from a thread so that a busy or stuck event loop cannot hide itself from the
liveness probe: /healthz reads a timestamp the loop writes, it does not ask the loop.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest


class HealthState:
    def __init__(self, liveness_timeout_s: float) -> None:
        self.liveness_timeout_s = liveness_timeout_s
        self.last_progress = time.monotonic()
        self.ready = False
        self.reason = "starting"
        # Loading a large model can take minutes; liveness is judged once the loop runs
        # (readiness keeps traffic away meanwhile).
        self.starting = True

    def progress(self) -> None:
        self.starting = False
        self.last_progress = time.monotonic()

    def live(self) -> bool:
        return self.starting or time.monotonic() - self.last_progress < self.liveness_timeout_s


class HealthServer:
    def __init__(self, host: str, port: int, state: HealthState,
                 registry: CollectorRegistry | None) -> None:
        self.state = state
        registries = [] if registry is None else \
            [registry] if registry is REGISTRY else [registry, REGISTRY]

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics" and registries:
                    body = b"".join(generate_latest(r) for r in registries)
                    self._send(200, body, CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    ok = state.live()
                    self._send(200 if ok else 503, b"ok\n" if ok else
                               b"no progress for %.0f s\n" % state.liveness_timeout_s)
                elif path == "/readyz":
                    self._send(200 if state.ready else 503,
                               b"ready\n" if state.ready else state.reason.encode() + b"\n")
                else:
                    self._send(404, b"not found\n")

            def _send(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="captionflow-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
