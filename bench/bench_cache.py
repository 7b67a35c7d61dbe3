"""The caption cache on a backlog with duplicates and redeliveries, with and without it, on
the vLLM CPU engine (tiny model) or a real one.

    python bench/bench_cache.py [--events 1000] [--in-flight 8] [--model DIR]

The backlog: 60% unique clips, 30% exact duplicates (the same bytes under another path
and a new event id, published later) and 10% redeliveries (an event again, id and path, as
after a crash). Each run caption its backlog through ``caption_event`` with the worker's
frame source, ``--in-flight`` events at a time, in backlog order; the run without the cache
and the run with a fresh file store each get their own clips (other seeds), so neither
finds the other's frames in vLLM's own multimodal cache. Printed: engine requests, wall
time and the cache's counts for each run (``--rounds``, the order alternating, each round
with fresh clips), then the content validator's cost (sha256 of the
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
    backend = VllmBackend(settings.serving, settings.video)
    await backend.start()
    off_runs, on_runs = [], []
    try:
        warm, _ = backlog(work / "warm", 8, seed=3)
        await run(settings, backend, warm, None, args.in_flight)
        for r in range(args.rounds):
            t0 = time.perf_counter()
            plain, _ = backlog(work, args.events, seed=10 + 2 * r)
            cached, clips = backlog(work, args.events, seed=11 + 2 * r)
            if r == 0:
                print(f"backlog: {len(plain)} events, {len({e.id for e in plain})} ids, "
                      f"{len(clips)} distinct clips (made in {time.perf_counter() - t0:.0f} s)")
            cache = open_cache(settings.model_copy(update={"cache": settings.cache.model_copy(
                update={"store": str(work / f"cache{r}")})}), model=model)
            assert cache is not None
            sides = [("without", None, plain, off_runs), ("with", cache, cached, on_runs)]
            for name, c, events, out in sides if r % 2 == 0 else sides[::-1]:
                wall, requests = await run(settings, backend, events, c, args.in_flight)
                out.append((wall, requests))
                extra = "" if c is None else (
                    f"; lookups {dict(c.stats)}; engine time saved {c.saved_engine_s:.1f} s "
                    f"(summed request latencies); tokens saved {dict(c.saved_tokens)}")
                print(f"round {r}, {name} cache: {requests} engine requests, {wall:.1f} s "
                      f"wall{extra}")
    finally:
        await backend.close()
    off_s = statistics.median(w for w, _ in off_runs)
    on_s = statistics.median(w for w, _ in on_runs)
    print(f"median of {args.rounds} rounds: requests {on_runs[0][1]} vs {off_runs[0][1]} "
          f"(ratio {on_runs[0][1] / off_runs[0][1]:.2f}), wall {on_s:.1f} vs {off_s:.1f} s "
          f"(ratio {on_s / off_s:.2f})")
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
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds, each with fresh clips, the two sides in alternating order")
    parser.add_argument("--cost-clips", type=int, default=20)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
