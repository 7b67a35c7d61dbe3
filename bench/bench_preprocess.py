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
- **mm processor**: vLLM 0.32's Qwen2.5-VL multimodal processor as the engine's frontend
  runs it (``create_processor(...)(prompt, items)``: the HF Qwen2-VL video processor's
  patchify into uint8 ``pixel_values_videos``, rescale and normalize being left to the
  device by ``mm_device_do_normalize``, plus the prompt update), minus the mm hash it also
  computes; with Qwen2.5-VL's pixel defaults (100,352..602,112 pixels, patch 14, merge 2)
  over the tiny model's tokenizer. Timed twice per repeat, alternating: **before** with
  transformers' stock code, **after** with ``captionflow.serving.fast_video_processor``
  installed (as the vLLM backend does), and asserted to give equal tensors.
- **HF processor, normalizing on the CPU** (not in the totals): the same HF video
  processor with rescale and normalize on the CPU, what the transformers backend (and vLLM
  with ``mm_device_do_normalize`` off) pays, stock and fast.

The floor is ``ffmpeg -threads 0 -i IN -vf fps=F,scale=W:H -pix_fmt rgb24 -f rawvideo``
(the child's CPU from ``getrusage``): decoding, sampling and scaling to the same size.

``--server`` measures instead what a real ``vllm serve`` (the openai backend's server,
tiny model, CPU) spends in its API process per 10 s 448p clip sent with the ``frames``
transport: started with ``VLLM_PLUGINS=`` (stock processor) and without (captionflow's
vLLM plugin installs the fast path), alternately, each clip's frames unique so that vLLM's
processor cache never hits.

    .venv/bin/python bench/bench_preprocess.py
    .venv/bin/python bench/bench_preprocess.py --server
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
import numpy as np
import psutil
import torch

from captionflow.config import VideoSettings
from captionflow.serving import fast_video_processor
from captionflow.serving.tiny_model import build_tiny_model
from captionflow.video.clip import Clip, VideoFacts
from captionflow.video.decode import decode_frames
from captionflow.video.demux import probe
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


def vllm_processor(model_dir: Path) -> Any:
    """vLLM's multimodal processor for Qwen2.5-VL with the model's own pixel defaults; its
    cache is off so that every call does the whole work, as a new clip does."""
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY

    config = ModelConfig(model=str(model_dir), mm_processor_cache_gb=0,
                         mm_processor_kwargs={"min_pixels": 128 * 28 * 28,
                                              "max_pixels": 768 * 28 * 28,
                                              "cap_pixels_per_frame": False})
    return MULTIMODAL_REGISTRY.create_processor(config)


def as_clip(frames: np.ndarray, fps: float) -> Clip:
    n, height, width, _ = frames.shape
    return Clip(frames=frames, frame_indices=tuple(range(n)),
                timestamps_s=tuple(i / fps for i in range(n)), sample_fps=fps,
                facts=VideoFacts(duration_s=n / fps, source_fps=fps, total_frames=n,
                                 width=width, height=height, codec="h264"))


def frontend(mm: Any, clip: Clip) -> Any:
    """One clip through vLLM's multimodal processor, as ``AsyncLLM`` hands it over."""
    items = mm.info.parse_mm_data({"video": (clip.frames, clip.vllm_metadata())})
    return mm("<|vision_start|><|video_pad|><|vision_end|>Describe the video.", items)


def measure(path: Path, fps: float, settings: VideoSettings, processor: Any, mm: Any,
            source: FrameSource, repeats: int) -> dict[str, float]:
    from vllm.multimodal.hasher import MultiModalHasher

    policy = SamplingPolicy.from_settings(settings, {"fps": fps})
    runs: dict[str, list[float]] = {}
    loop = asyncio.get_event_loop()
    loop.run_until_complete(pool_cpu(source, path, fps))  # starts the decoder processes

    def add(name: str, value: float) -> None:
        runs.setdefault(name, []).append(value)

    for repeat in range(repeats):
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
        clip = as_clip(frames, fps)
        timed = {}
        for fast_on in (False, True) if repeat % 2 == 0 else (True, False):
            (fast_video_processor.install if fast_on else fast_video_processor.uninstall)()
            timed[fast_on] = (*cpu(frontend, mm, clip),
                              cpu(processor, videos=[frames], return_tensors="pt")[0])
        (stock_s, stock, hf_stock_s), (fast_s, fast, hf_fast_s) = timed[False], timed[True]
        before = stock["mm_kwargs"]["video"][0]
        after = fast["mm_kwargs"]["video"][0]
        assert all(torch.equal(before[k].data, after[k].data) for k in before), \
            "the fast path changed the processor's output"
        _, grid_h, grid_w = (int(v) for v in before["video_grid_thw"].data)
        assert (grid_h * 14, grid_w * 14) == (plan.height, plan.width), \
            "the frames are not on the processor's grid: it resizes them again"
        add("fetch", fetch_s)
        add("probe", probe_s)
        add("decode+sample", max(0.0, decode_s - resize_s))
        add("resize", resize_s)
        add("handover", pooled - in_process)
        add("mm hash", hash_s)
        add("mm processor", stock_s - hash_s)
        add("mm processor, fast", fast_s - hash_s)
        add("HF normalizing, stock", hf_stock_s)
        add("HF normalizing, fast", hf_fast_s)
        add("ffmpeg floor", ffmpeg_floor(path, fps, plan.height, plan.width))
    result = {k: statistics.median(v) for k, v in runs.items()}
    result["frames"] = len(plan.indices)
    result["size"] = f"{plan.width}x{plan.height}"  # type: ignore[assignment]
    return result


async def event_loop_share(requests: int) -> tuple[float, float, float]:
    """Event-loop thread CPU against this process's CPU per caption request on the
    in-process engine (tiny model, 448p clips): whatever the clip path runs on the loop
    shows in the first figure. Returns (loop ms, process ms, wall ms) per request."""
    from captionflow.serving.base import CaptionRequest
    from captionflow.serving.engine_setup import prepare_vllm_environment, tiny_cpu_settings
    from captionflow.serving.vllm_engine import VllmBackend

    work = CLIP_DIR / "engine"
    prepare_vllm_environment(work)
    backend = VllmBackend(tiny_cpu_settings(build_tiny_model(CLIP_DIR / "model"),
                                            temperature=0.0, max_tokens=4, work_dir=work))
    await backend.start()
    rng = np.random.default_rng(0)
    clips = [as_clip(rng.integers(0, 256, (20, 448, 784, 3), dtype=np.uint8), 2.0)
             for _ in range(requests + 1)]
    try:
        await backend.caption(CaptionRequest("warm", clips[0], "Describe."))
        loop_started, cpu_started = time.thread_time(), time.process_time()
        wall_started = time.perf_counter()
        await asyncio.gather(*(backend.caption(CaptionRequest(f"r{i}", clip, "Describe."))
                               for i, clip in enumerate(clips[1:])))
        wall_s = time.perf_counter() - wall_started
        loop_s, cpu_s = time.thread_time() - loop_started, time.process_time() - cpu_started
    finally:
        await backend.close()
    return (loop_s * 1000 / requests, cpu_s * 1000 / requests, wall_s * 1000 / requests)


async def server_cpu(pairs: int, clips: int) -> None:
    """API-process CPU-ms per 448p clip of a real vLLM server, stock against the plugin."""
    import dataclasses
    import signal

    import httpx

    from captionflow.serving.base import CaptionRequest
    from captionflow.serving.engine_setup import (
        prepare_vllm_environment,
        tiny_cpu_settings,
        vllm_server_command,
    )
    from captionflow.serving.openai_client import OpenAIBackend
    from captionflow.video.source import load_clips

    work = CLIP_DIR / "server"
    prepare_vllm_environment(work)
    port = 18_731
    settings = tiny_cpu_settings(
        build_tiny_model(CLIP_DIR / "model"), temperature=0.0, max_tokens=4, work_dir=work,
        # the tiny model merges no patches: a 448p clip is ~4,500 tokens
        max_model_len=8192, max_num_batched_tokens=8192, openai_base_url=f"http://127.0.0.1:{port}/v1", openai_max_retries=0,
        mm_processor_kwargs={"min_pixels": 128 * 28 * 28, "max_pixels": 768 * 28 * 28,
                             "cap_pixels_per_frame": False})
    name, size, seconds, fps = CLASSES[0]
    [clip] = load_clips(str(make_clip(size, seconds)),
                        VideoSettings(any_local_path=True, fps=fps))
    serial = iter(range(1_000_000))

    def unique() -> CaptionRequest:
        i = next(serial)
        frames = clip.frames.copy()
        frames[:, 0, :8, 0] = np.frombuffer(i.to_bytes(8, "little"), np.uint8)
        return CaptionRequest(f"r{i}", dataclasses.replace(clip, frames=frames), "Describe.")

    per_clip: dict[str, list[float]] = {"stock": [], "plugin": []}
    print(f"{name}: {len(clip.frame_indices)} frames at {clip.frames.shape[2]}x"
          f"{clip.frames.shape[1]}, {clips} clips per server start; load(1 min) "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    for pair in range(pairs):
        for side in ("stock", "plugin") if pair % 2 == 0 else ("plugin", "stock"):
            env = dict(os.environ)
            env.pop("VLLM_PLUGINS", None)
            if side == "stock":
                env["VLLM_PLUGINS"] = ""
            log_path = work / f"server-{pair}-{side}.log"
            with log_path.open("wb") as log:
                proc = subprocess.Popen(  # noqa: ASYNC220 (returns at once)
                    vllm_server_command(settings, port=port), env=env, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True)
            backend = OpenAIBackend(settings)
            try:
                async with httpx.AsyncClient() as client:
                    for _ in range(300):
                        assert proc.poll() is None, log_path.read_text()[-3000:]
                        try:
                            if (await client.get(f"http://127.0.0.1:{port}/health")
                                    ).status_code == 200:
                                break
                        except httpx.HTTPError:
                            pass
                        await asyncio.sleep(1.0)
                await backend.start()
                for _ in range(2):  # first requests load lazy imports and kernels
                    await backend.caption(unique())
                api = psutil.Process(proc.pid)
                before = sum(api.cpu_times()[:2])
                for _ in range(clips):
                    await backend.caption(unique())
                cpu_ms = (sum(api.cpu_times()[:2]) - before) * 1000 / clips
            finally:
                await backend.close()
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
            plugged = "captionflow fast video preprocessing in use" in log_path.read_text()
            assert plugged == (side == "plugin"), f"{side} server: plugin loaded={plugged}"
            per_clip[side].append(cpu_ms)
            print(f"pair {pair} {side:6s}: API process {cpu_ms:6.1f} CPU-ms per clip, "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    stock, plugin = (statistics.median(per_clip[k]) for k in ("stock", "plugin"))
    print(f"median: stock {stock:.1f}, plugin {plugin:.1f} CPU-ms per clip in the API "
          f"process ({plugin / stock:.2f}x, {stock - plugin:.1f} ms less)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--event-loop", action="store_true",
                        help="only measure the event loop's share on the tiny engine")
    parser.add_argument("--server", action="store_true",
                        help="only measure a vLLM server's API process, stock vs plugin")
    parser.add_argument("--pairs", type=int, default=3, help="server starts per side")
    parser.add_argument("--clips", type=int, default=20, help="clips per server start")
    args = parser.parse_args()
    if args.server:
        asyncio.run(server_cpu(args.pairs, args.clips))
        return
    if args.event_loop:
        loop_ms, cpu_ms, wall_ms = asyncio.run(event_loop_share(8))
        print(f"per 448p request on the tiny engine: event-loop thread {loop_ms:.1f} CPU-ms "
              f"of {cpu_ms:.1f} CPU-ms in this process ({loop_ms / cpu_ms:.0%}), "
              f"{wall_ms:.0f} ms wall")
        return
    from transformers import Qwen2VLVideoProcessor

    processor = Qwen2VLVideoProcessor(cap_pixels_per_frame=False)
    mm = vllm_processor(build_tiny_model(CLIP_DIR / "model"))
    warm = np.zeros((4, 112, 196, 3), np.uint8)
    for install in (fast_video_processor.install, fast_video_processor.uninstall):
        install()  # both paths run once before anything is timed (lazy loads and imports)
        frontend(mm, as_clip(warm, 2.0))
        processor(videos=[warm], return_tensors="pt")
    settings = VideoSettings(any_local_path=True)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    source = FrameSource(settings)
    print(f"{os.cpu_count()} cores here, load(1 min) {os.getloadavg()[0]:.1f}; CPU-seconds "
          f"per clip, median of {args.repeats}; host = {HOST_CORES} cores", flush=True)
    stages = ["fetch", "probe", "decode+sample", "resize", "handover", "mm hash"]
    extra = ["mm processor", "mm processor, fast", "HF normalizing, stock",
             "HF normalizing, fast", "ffmpeg floor"]
    try:
        for name, size, seconds, fps in CLASSES:
            path = make_clip(size, seconds)
            r = measure(path, fps, settings, processor, mm, source, args.repeats)
            common = sum(r[s] for s in stages)
            before = common + r["mm processor"]
            after = common + r["mm processor, fast"]
            print(f"\n{name}: {r['frames']} frames at {r['size']}")
            for s in [*stages, *extra]:
                print(f"  {s:24s} {r[s] * 1000:8.1f} ms")
            floor = r["ffmpeg floor"]
            ours = r["probe"] + r["decode+sample"] + r["resize"]
            print(f"  ours (probe+decode+resize) / ffmpeg floor: {ours / floor:.2f}")
            print(f"  mm processor after/before: "
                  f"{r['mm processor, fast'] / r['mm processor']:.2f}x; "
                  f"HF normalizing on the CPU after/before: "
                  f"{r['HF normalizing, fast'] / r['HF normalizing, stock']:.2f}x")
            print(f"  total before {before * 1000:.1f} ms -> {HOST_CORES / before:.1f} clips/s "
                  f"per {HOST_CORES}-core host; after {after * 1000:.1f} ms -> "
                  f"{HOST_CORES / after:.1f} clips/s ({after / before:.2f}x the CPU, "
                  f"cut {(1 - after / before) * 100:.0f}%)", flush=True)
    finally:
        loop.run_until_complete(source.close())
        fast_video_processor.uninstall()
    print(f"\nload(1 min) after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
