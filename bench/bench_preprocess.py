"""CPU-seconds per clip before the engine, per stage, for three clip classes, against an
ffmpeg floor; and the clips/s one 16-core host can feed.

Stages, each measured with ``time.process_time`` in this process (codec threads
included), the median of ``--repeats``:

- **fetch**: ``captionflow.video.fetch`` of a local file (an object store or HTTP adds its
  own transfer cost, not measured here);
- **probe**: the demux pass that indexes every packet (``decode.probe``);
- **decode+sample**: ``decode.decode_frames`` at the policy's output size, minus the resize;
- **resize**: libswscale scaling and RGB conversion of the sampled frames to that size
  (``VideoFrame.reformat``, timed alone on the same frames);
- **handover**: ``FrameSource`` (fetch in a thread, probe and decode in a warm decoder
  process; parent and child CPU) minus the same work in-process: the cost of the process
  boundary (noisy: a difference of two measurements, it can come out below zero);
- **mm hash**: vLLM's multimodal processor cache key (``MultiModalHasher``, blake3) of the
  frames, which the frontend computes for every request;
- **mm processor**: the HF Qwen2-VL video processor that vLLM's frontend runs
  (rescale, normalize, patchify into ``pixel_values_videos``) with the Qwen2.5-VL
  defaults (pixels 100,352..602,112, patch 14, merge 2): once as vLLM calls it
  (``do_resize`` on: it resizes again, to the same 28-multiple grid), once with
  ``do_resize=False`` (the frames are already on the grid).

The floor is ``ffmpeg -threads 0 -i IN -vf fps=F,scale=W:H -pix_fmt rgb24 -f rawvideo``
(the child's CPU from ``getrusage``): decoding, sampling and scaling to the same size.

    .venv/bin/python bench/bench_preprocess.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import psutil

from captionflow.config import VideoSettings
from captionflow.video.decode import decode_frames, probe
from captionflow.video.fetch import fetch
from captionflow.video.sampling import SamplingPolicy
from captionflow.video.source import FrameSource, _decode_kwargs, _probe_kwargs, plan_clips

CLIP_DIR = Path(tempfile.gettempdir()) / "captionflow-bench-preprocess"
HOST_CORES = 16
CLASSES = [  # name, size, seconds, sampling fps
    ("10 s 448p, 2 fps", (796, 448), 10, 2.0),
    ("10 s 1080p, 2 fps", (1920, 1080), 10, 2.0),
    ("120 s 1080p, 0.5 fps", (1920, 1080), 120, 0.5),
]


def make_clip(size: tuple[int, int], seconds: int) -> Path:
    """x264 (veryfast, GOP 250, 25 fps) of ffmpeg's testsrc2; a 120 s clip is a 10 s one
    repeated by stream copy, which decodes the same as one encoded whole."""
    CLIP_DIR.mkdir(parents=True, exist_ok=True)
    w, h = size
    ten = CLIP_DIR / f"c{h}_10s.mp4"
    if not ten.exists():
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                        f"testsrc2=size={w}x{h}:rate=25", "-t", "10", "-c:v", "libx264",
                        "-preset", "veryfast", "-g", "250", "-pix_fmt", "yuv420p", str(ten)],
                       check=True)
    if seconds == 10:
        return ten
    out = CLIP_DIR / f"c{h}_{seconds}s.mp4"
    if not out.exists():
        listing = CLIP_DIR / f"list_{h}_{seconds}.txt"
        listing.write_text("".join(f"file '{ten}'\n" for _ in range(seconds // 10)))
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "concat", "-safe", "0", "-i",
                        str(listing), "-c", "copy", str(out)], check=True)
    return out


def cpu(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    started = time.process_time()
    result = fn(*args, **kwargs)
    return time.process_time() - started, result


def resize_cpu(path: Path, index: Any, indices: list[int], height: int, width: int) -> float:
    """CPU of scaling + RGB conversion alone, on the sampled frames decoded beforehand."""
    wanted = {int(index.pts[i]) for i in indices}
    frames = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if frame.pts in wanted:
                frames.append(frame)
    started = time.process_time()
    for frame in frames:
        frame.reformat(width=width, height=height, format="rgb24").to_ndarray()
    return time.process_time() - started


def ffmpeg_floor(path: Path, fps: float, height: int, width: int) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(["ffmpeg", "-v", "error", "-threads", "0", "-i", str(path), "-vf",
                    f"fps={fps},scale={width}:{height}", "-pix_fmt", "rgb24", "-f", "rawvideo",
                    "-y", os.devnull], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def tree_cpu() -> float:
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


async def pool_cpu(source: FrameSource, path: Path, fps: float) -> float:
    started = tree_cpu()
    clips = await source.clips(str(path), {"fps": fps})
    assert clips
    return tree_cpu() - started


def measure(path: Path, fps: float, settings: VideoSettings, processor: Any,
            source: FrameSource, repeats: int) -> dict[str, float]:
    from vllm.multimodal.hasher import MultiModalHasher

    policy = SamplingPolicy.from_settings(settings, {"fps": fps})
    runs: dict[str, list[float]] = {}
    loop = asyncio.get_event_loop()
    loop.run_until_complete(pool_cpu(source, path, fps))  # starts the decoder processes

    def add(name: str, value: float) -> None:
        runs.setdefault(name, []).append(value)

    for _ in range(repeats):
        fetch_s, video = cpu(fetch, str(path), settings)
        probe_s, index = cpu(probe, **_probe_kwargs(video.source, settings))
        plan = plan_clips(index, policy, settings)[0]
        decode_s, (frames, _) = cpu(decode_frames,
                                    **_decode_kwargs(video.source, index, plan, settings))
        video.release()
        resize_s = resize_cpu(path, index, plan.indices, plan.height, plan.width)
        in_process = fetch_s + probe_s + decode_s
        pooled = loop.run_until_complete(pool_cpu(source, path, fps))
        hash_s, _ = cpu(MultiModalHasher.hash_kwargs, "blake3", video=frames)
        proc_s, out = cpu(processor, videos=[frames], return_tensors="pt")
        proc_nr_s, out_nr = cpu(processor, videos=[frames], return_tensors="pt",
                                do_resize=False)
        assert out["pixel_values_videos"].shape == out_nr["pixel_values_videos"].shape, \
            "the frames are not on the processor's grid: skipping its resize changes them"
        add("fetch", fetch_s)
        add("probe", probe_s)
        add("decode+sample", max(0.0, decode_s - resize_s))
        add("resize", resize_s)
        add("handover", pooled - in_process)
        add("mm hash", hash_s)
        add("mm processor", proc_s)
        add("mm processor, no resize", proc_nr_s)
        add("ffmpeg floor", ffmpeg_floor(path, fps, plan.height, plan.width))
    result = {k: statistics.median(v) for k, v in runs.items()}
    result["frames"] = len(plan.indices)
    result["size"] = f"{plan.width}x{plan.height}"  # type: ignore[assignment]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from transformers import Qwen2VLVideoProcessor

    processor = Qwen2VLVideoProcessor()
    settings = VideoSettings(any_local_path=True)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    source = FrameSource(settings)
    print(f"{os.cpu_count()} cores here, load(1 min) {os.getloadavg()[0]:.1f}; CPU-seconds "
          f"per clip, median of {args.repeats}; host = {HOST_CORES} cores", flush=True)
    stages = ["fetch", "probe", "decode+sample", "resize", "handover", "mm hash",
              "mm processor"]
    try:
        for name, size, seconds, fps in CLASSES:
            path = make_clip(size, seconds)
            r = measure(path, fps, settings, processor, source, args.repeats)
            before = sum(r[s] for s in stages)
            after = before - r["mm processor"] + r["mm processor, no resize"]
            print(f"\n{name}: {r['frames']} frames at {r['size']}")
            for s in [*stages, "mm processor, no resize", "ffmpeg floor"]:
                print(f"  {s:24s} {r[s] * 1000:8.1f} ms")
            floor = r["ffmpeg floor"]
            ours = r["probe"] + r["decode+sample"] + r["resize"]
            print(f"  ours (probe+decode+resize) / ffmpeg floor: {ours / floor:.2f}")
            print(f"  total before {before * 1000:.1f} ms -> {HOST_CORES / before:.1f} clips/s "
                  f"per {HOST_CORES}-core host; without the processor's resize "
                  f"{after * 1000:.1f} ms -> {HOST_CORES / after:.1f} clips/s "
                  f"({after / before:.2f}x the CPU)", flush=True)
    finally:
        loop.run_until_complete(source.close())
    print(f"\nload(1 min) after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
