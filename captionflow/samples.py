"""Sample videos made with PyAV, for the demo and for trying captionflow without data."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

# (name, background RGB, square RGB): distinct scenes so captions can differ.
SCENES = (
    ("red-square-on-blue", (20, 40, 160), (220, 30, 30)),
    ("green-square-on-white", (235, 235, 235), (30, 170, 60)),
    ("yellow-square-on-black", (10, 10, 10), (240, 210, 20)),
    ("white-square-on-purple", (90, 30, 120), (250, 250, 250)),
)


def make_sample_video(path: Path, background: tuple[int, int, int],
                      square: tuple[int, int, int], *, seconds: float = 2.0, fps: int = 8,
                      width: int = 224, height: int = 168) -> Path:
    """An H.264 clip of a square sliding left to right."""
    size = height // 3
    frames = int(seconds * fps)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            img = np.empty((height, width, 3), dtype=np.uint8)
            img[:] = background
            x = int((width - size) * i / max(1, frames - 1))
            y = (height - size) // 2
            img[y:y + size, x:x + size] = square
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_sample_videos(directory: Path, count: int = len(SCENES)) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name, background, square in SCENES[:count]:
        path = directory / f"{name}.mp4"
        if not path.exists():
            make_sample_video(path, background, square)
        out.append(path)
    return out
