"""A loopback HTTP server that answers some requests itself and forwards the rest to a real
server: a store that refuses the worker's credentials for a while, an engine that answers
429 for a while, a server that fails every POST. Each request is counted by method and path.
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# (status, headers, body) to answer with, or None to forward upstream.
Answer = tuple[int, dict[str, str], bytes] | None
Rule = Callable[[str, str], Answer]  # (method, path) -> Answer

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-authorization", "proxy-authenticate", "content-length"}


class Loopback:
    def __init__(self, rule: Rule, *, upstream: str | None = None) -> None:
        self.rule = rule
        self.requests: Counter[tuple[str, str]] = Counter()
        self._upstream = urlsplit(upstream) if upstream else None
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = self.path.split("?", 1)[0]
                with outer._lock:
                    outer.requests[(self.command, path)] += 1
                answer = outer.rule(self.command, path)
                if answer is None:
                    answer = outer._forward(self.command, self.path, dict(self.headers), body)
                status, headers, payload = answer
                self.send_response(status)
                for name, value in headers.items():
                    if name.lower() not in _HOP_BY_HOP:
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle

            def log_message(self, *args: object) -> None:
                pass

        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def count(self, method: str, suffix: str = "") -> int:
        with self._lock:
            return sum(n for (m, p), n in self.requests.items()
                       if m == method and p.endswith(suffix))

    def _forward(self, method: str, path: str, headers: dict[str, str],
                 body: bytes) -> tuple[int, dict[str, str], bytes]:
        assert self._upstream is not None, "no upstream to forward to"
        conn = http.client.HTTPConnection(self._upstream.hostname, self._upstream.port,
                                          timeout=600)
        try:
            sent = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}
            conn.request(method, path, body=body or None, headers=sent)
            response = conn.getresponse()
            payload = response.read()
            return response.status, dict(response.getheaders()), payload
        finally:
            conn.close()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> Loopback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def s3_error(code: str, status: int = 403) -> tuple[int, dict[str, str], bytes]:
    """An S3 error answer, as a store that refuses the request sends it."""
    body = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
            f"<Message>{code} from the test store</Message></Error>").encode()
    return status, {"Content-Type": "application/xml"}, body
