"""Pytest fixtures for the video tests: the PyAV corpus and a loopback HTTP server."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.support.corpus import CorpusFile, build_corpus

Route = Callable[[BaseHTTPRequestHandler], None]


@pytest.fixture(scope="session")
def video_corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("video-corpus")


@pytest.fixture(scope="session")
def video_corpus(video_corpus_dir: Path) -> dict[str, CorpusFile]:
    """Every corpus file by name, built once per session."""
    return build_corpus(video_corpus_dir)


class LoopbackServer:
    """A real HTTP server on 127.0.0.1 whose routes tests set per path."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        routes = self.routes

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = routes.get(self.path.split("?")[0])
                if route is None:
                    self.send_error(404)
                    return
                try:
                    route(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up, as the tests intend

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def serve_file(self, path: str, file: Path, *, declare_length: bool = True) -> None:
        def route(h: BaseHTTPRequestHandler) -> None:
            data = file.read_bytes()
            h.send_response(200)
            h.send_header("Content-Type", "video/mp4")
            if declare_length:
                h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        self.routes[path] = route

    def redirect(self, path: str, location: str, status: int = 302) -> None:
        def route(h: BaseHTTPRequestHandler) -> None:
            h.send_response(status)
            h.send_header("Location", location)
            h.send_header("Content-Length", "0")
            h.end_headers()
        self.routes[path] = route

    def stall(self, path: str, seconds: float) -> None:
        def route(h: BaseHTTPRequestHandler) -> None:
            h.send_response(200)
            h.send_header("Content-Length", "1000")
            h.end_headers()
            h.wfile.write(b"x" * 10)
            h.wfile.flush()
            time.sleep(seconds)
        self.routes[path] = route


@pytest.fixture
def http_server() -> Iterator[LoopbackServer]:
    server = LoopbackServer()
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
