"""Write the two short clips that examples/sample_data.json names (./videos/sample1.mp4 and
./videos/sample2.mp4, relative to where you run it). Needs only PyAV and numpy.

    python examples/make_sample_videos.py && mkdir -p dataflow/example/video_caption && \\
        cp examples/sample_data.json dataflow/example/video_caption/
"""

from pathlib import Path

import av
import numpy as np


def make_clip(path: Path, seed: int, *, seconds: int = 4, fps: int = 8, width: int = 320,
              height: int = 240) -> None:
    rng = np.random.default_rng(seed)
    tiles = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(seconds * fps):
            # Tiles sliding sideways: motion the model can see.
            image = np.kron(np.roll(tiles, i, axis=1), np.ones((16, 16, 1), dtype=np.uint8))
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


if __name__ == "__main__":
    Path("videos").mkdir(exist_ok=True)
    for n in (1, 2):
        make_clip(Path("videos") / f"sample{n}.mp4", seed=n)
        print(f"videos/sample{n}.mp4")
