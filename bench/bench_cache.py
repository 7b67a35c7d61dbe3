"""The caption cache on a backlog with duplicates and redeliveries, with and without it, on
the vLLM CPU engine (tiny model) or a real one.

    python bench/bench_cache.py [--events 1000] [--in-flight 8] [--model DIR]

The backlog: 60% unique clips, 30% exact duplicates (the same bytes under another path
and a new event id, published later) and 10% redeliveries (an event again, id and path, as
after a crash). Each run caption its backlog through ``caption_event`` with the worker's
frame source, ``--in-flight`` events at a time, in backlog order; the run without the cache
and the run with a fresh file store each get their own clips (other seeds), so neither
finds the other's frames in vLLM's own multimodal cache. Printed: engine requests, wall
time and the cache's counts for each run, then the content validator's cost (sha256 of the
whole file) against decoding, in CPU-ms per clip, measured in this process with the engine
idle, for the backlog's clips and for one 10 s 720p clip.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captionflow.cache import CaptionCache, open_cache
from captionflow.captioning import Attempts, caption_event
from captionflow.config import Settings
from captionflow.schemas.events import VideoEvent
from captionflow.serving import (
    VllmBackend,
    build_tiny_model,
    prepare_vllm_environment,
    tiny_cpu_settings,
)
from captionflow.serving.base import CaptionRequest, CaptionResult
from captionflow.video.source import FrameSource, load_clips
from captionflow.video.validator import file_digest
from tests.support.worker_fixtures import make_video


def backlog(work: Path, events: int, seed: int) -> tuple[list[VideoEvent], list[Path]]:
    """Events in publishing order: duplicates and redeliveries come after their original."""
    rng = random.Random(seed)
    unique = events - int(events * 0.3) - int(events * 0.1)
    folder = work / f"set{seed}"
    (folder / "copies").mkdir(parents=True)
    clips = [make_video(folder / f"v{i}.mp4", seed * 100_000 + i) for i in range(unique)]
    out = [VideoEvent(id=f"s{seed}-u{i}", video=[str(c)]) for i, c in enumerate(clips)]
    for d in range(int(events * 0.3)):
        src = rng.randrange(unique)
        copy = folder / "copies" / f"d{d}.mp4"
        shutil.copyfile(clips[src], copy)
        at = rng.randrange(src + 1, len(out) + 1)
        out.insert(at, VideoEvent(id=f"s{seed}-d{d}", video=[str(copy)]))
    for _ in range(int(events * 0.1)):
        i = rng.randrange(len(out))
        out.insert(rng.randrange(i + 1, len(out) + 1), out[i])
    return out, clips


async def run(settings: Settings, backend: VllmBackend, events: list[VideoEvent],
              cache: CaptionCache | None, in_flight: int) -> tuple[float, int]:
    requests = 0

    async def caption(request: CaptionRequest) -> CaptionResult:
        nonlocal requests
        requests += 1
        return await backend.caption(request)

    gate = asyncio.Semaphore(in_flight)

    async def one(event: VideoEvent, frames: FrameSource) -> None:
        async with gate:
            await caption_event(event, clips=frames.open, caption=caption, settings=settings,
                                attempts=Attempts(settings.worker), cache=cache)

    async with FrameSource(settings.video) as frames:
        started = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for event in events:
                group.create_task(one(event, frames))
        return time.perf_counter() - started, requests


def cpu_ms(fn, *args) -> float:
    started = time.process_time()
    fn(*args)
    return (time.process_time() - started) * 1000


async def main_async(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    prepare_vllm_environment(work / "vllm")
    model = args.model or str(build_tiny_model(work / "models"))
    serving = tiny_cpu_settings(model, temperature=0.0, max_tokens=args.max_tokens,
                                work_dir=work / "vllm")
    settings = Settings(serving=serving.model_dump(), worker={"quality_gate_retries": 0},
                        video={"allowed_roots": (work,), "fps": 2.0, "max_frames": 4,
                               "min_frames": 2, "min_pixels": 28 * 28 * 4,
                               "max_pixels": 112 * 84},
                        cache={"enabled": True, "store": str(work / "cache")})
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    plain, _ = backlog(work, args.events, seed=1)
    cached, clips = backlog(work, args.events, seed=2)
    print(f"backlog: {len(plain)} events, {len({e.id for e in plain})} ids, "
          f"{len(clips)} distinct clips (made in {time.perf_counter() - t0:.0f} s)")
    backend = VllmBackend(settings.serving, settings.video)
    await backend.start()
    try:
        warm, _ = backlog(work / "warm", 8, seed=3)
        await run(settings, backend, warm, None, args.in_flight)
        off_s, off_requests = await run(settings, backend, plain, None, args.in_flight)
        print(f"without cache: {off_requests} engine requests, {off_s:.1f} s wall")
        cache = open_cache(settings, model=model)
        assert cache is not None
        on_s, on_requests = await run(settings, backend, cached, cache, args.in_flight)
        print(f"with cache:    {on_requests} engine requests, {on_s:.1f} s wall; "
              f"lookups {dict(cache.stats)}; engine time saved "
              f"{cache.saved_engine_s:.1f} s; tokens saved {dict(cache.saved_tokens)}")
        print(f"ratio with/without: requests {on_requests / off_requests:.2f}, "
              f"wall {on_s / off_s:.2f}")
    finally:
        await backend.close()
    sample = clips[:args.cost_clips]
    big = make_video(work / "big.mp4", 7, frames=300, fps=30, width=1280, height=720)
    for name, files, video in (
            (f"backlog clip (112x84, 8 frames, ~{clips[0].stat().st_size // 1024} KiB)",
             sample, settings.video),
            (f"10 s 720p clip ({big.stat().st_size // 1024} KiB)", [big] * 3,
             settings.video.model_copy(update={"max_pixels": 448 * 252, "max_frames": 20}))):
        hash_ms = [cpu_ms(file_digest, f) for f in files]
        decode_ms = [cpu_ms(load_clips, str(f), video) for f in files]
        print(f"{name}: sha256 {statistics.median(hash_ms):.2f} CPU-ms, decode "
              f"{statistics.median(decode_ms):.1f} CPU-ms per clip (median of {len(files)}); "
              f"hash/decode {statistics.median(hash_ms) / statistics.median(decode_ms):.3f}")
    print(f"load(1 min) {load_before:.2f} -> {os.getloadavg()[0]:.2f}; "
          f"max_tokens={args.max_tokens}, in flight {args.in_flight}")
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: tiny model)")
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--cost-clips", type=int, default=20)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
