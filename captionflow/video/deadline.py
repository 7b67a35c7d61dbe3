"""A wall-clock deadline under every socket operation of an HTTP fetch.

Per-read timeouts cannot bound a download: a server that sends one byte just inside the
read timeout keeps every read alive forever, in the headers as well as the body. This
network backend for httpcore clamps the timeout of every connect, TLS handshake, read and
write to the time left before one deadline shared by all the redirect hops, and fails the
operation once it has passed. A read blocked on a silent server ends at the deadline, and
one trickling bytes ends at its first read after it.
"""

from __future__ import annotations

import time
import typing

import httpcore


class Deadline:
    """A point on the monotonic clock; ``clamp`` fits a timeout under it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def clamp(self, timeout: float | None, error: type[Exception]) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise error(f"the total deadline of {self.seconds:g} s passed")
        return left if timeout is None else min(timeout, left)


class DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's synchronous socket backend with every timeout clamped to ``deadline``."""

    def __init__(self, deadline: Deadline,
                 backend: httpcore.NetworkBackend | None = None) -> None:
        self._deadline = deadline
        self._backend = backend or httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: typing.Iterable[typing.Any] | None = None,
                    ) -> httpcore.NetworkStream:
        stream = self._backend.connect_tcp(
            host, port, self._deadline.clamp(timeout, httpcore.ConnectTimeout),
            local_address, socket_options)
        return _DeadlineStream(stream, self._deadline)

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: typing.Iterable[typing.Any] | None = None,
                            ) -> httpcore.NetworkStream:
        raise httpcore.UnsupportedProtocol("video fetches do not use unix sockets")

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, max(0.0, self._deadline.at - time.monotonic())))


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream, deadline: Deadline) -> None:
        self._stream = stream
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, self._deadline.clamp(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, self._deadline.clamp(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context: typing.Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        stream = self._stream.start_tls(
            ssl_context, server_hostname, self._deadline.clamp(timeout, httpcore.ConnectTimeout))
        return _DeadlineStream(stream, self._deadline)

    def get_extra_info(self, info: str) -> typing.Any:
        return self._stream.get_extra_info(info)
