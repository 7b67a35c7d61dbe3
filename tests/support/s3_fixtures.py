"""A real S3-compatible server on loopback: moto's server mode (PyPI ``moto[server]``).

``moto_server`` keeps everything in memory; a stopped server forgets its buckets. The
session server is shared; tests that stop a server start their own with
:class:`MotoServer`.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from captionflow.config import VideoSettings

# Fixed test credentials: moto accepts any, and nothing may come from the user's ~/.aws.
S3_ENV = {"AWS_ACCESS_KEY_ID": "captionflow-test", "AWS_SECRET_ACCESS_KEY": "captionflow-test",
          "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
          "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
_buckets = itertools.count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _moto_binary() -> str:
    sibling = Path(sys.executable).with_name("moto_server")
    found = str(sibling) if sibling.exists() else shutil.which("moto_server")
    if not found:
        raise RuntimeError("moto_server is not installed: pip install 'moto[server]' "
                           "(it is in captionflow's dev extras)")
    return found


class MotoServer:
    """One ``moto_server`` process on 127.0.0.1; ``start`` fails loudly if it does not
    answer within ``start_timeout_s``."""

    def __init__(self, log_path: Path, port: int | None = None) -> None:
        self.log_path = log_path
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, start_timeout_s: float = 30.0) -> MotoServer:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [_moto_binary(), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **S3_ENV})
        log.close()
        deadline = time.monotonic() + start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"moto_server exited with {self.process.returncode} at start-up: "
                    f"{self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto_server did not answer on port {self.port} within "
                           f"{start_timeout_s} s; log: {self.log_path}")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def client(self) -> Any:
        import boto3

        return boto3.session.Session(
            aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=S3_ENV["AWS_REGION"]).client("s3", endpoint_url=self.endpoint_url)

    def new_bucket(self, prefix: str = "cf") -> str:
        name = f"{prefix}-{next(_buckets)}-{os.getpid()}"
        self.client().create_bucket(Bucket=name)
        return name

    def video_settings(self, **overrides: Any) -> VideoSettings:
        """Settings that reach this server, with s3 allowed."""
        values: dict[str, Any] = {"allowed_schemes": ("file", "http", "https", "s3"),
                                  "s3_endpoint_url": self.endpoint_url,
                                  "s3_addressing_style": "path"}
        values.update(overrides)
        return VideoSettings(**values)


@pytest.fixture(scope="session")
def s3_env() -> Iterator[None]:
    """The test credentials in this process's environment (the worker reads the AWS chain)."""
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory, s3_env: None) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: MotoServer) -> str:
    """A fresh bucket on the session server."""
    return s3_server.new_bucket()


# A long 1080p clip for the range-read measurements: x264's default keyframe interval (250)
# at the film rate, 2 Mbit/s, a noise patch moving across a static background so that
# P-frames carry most of the bytes, as in camera footage (keyframes ~1% of the file).
LONG_CLIP = {"seconds": 120, "width": 1920, "height": 1080, "fps": 24, "gop": 250,
             "bit_rate": 2_000_000}


def make_long_clip(path: Path, *, seconds: int, width: int, height: int, fps: int, gop: int,
                   bit_rate: int) -> Path:
    import av
    import numpy as np

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    background = ((xx // 8 + yy // 8) % 64 * 2 + 60).astype(np.uint8)
    chroma = np.full((height // 2, width), 128, np.uint8)
    tmp = path.with_suffix(".tmp.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={
            "preset": "ultrafast", "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.codec_context.bit_rate = bit_rate
        for i in range(seconds * fps):
            luma = background.copy()
            x = (i * 8) % (width - 256)
            luma[400:528, x:x + 256] = rng.integers(0, 255, (128, 256), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(np.vstack([luma, chroma]), format="yuv420p")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.rename(path)
    return path


@pytest.fixture(scope="session")
def long_1080p_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LONG_CLIP, encoded once per session (~30 s)."""
    return make_long_clip(tmp_path_factory.mktemp("long-clip") / "long_1080p.mp4", **LONG_CLIP)
