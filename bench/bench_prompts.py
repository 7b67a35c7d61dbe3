"""Several prompts on one video (one event with ``options.prompts``) against the same prompts
as separate events, on the vLLM backend with the tiny model (CPU engine) or a real one.

    python bench/bench_prompts.py [--model DIR] [--prompts 3] [--rounds 5] [--max-tokens 32]

Each round makes a video of its own (so neither side finds the other's frames in vLLM's
multimodal caches), then times, in alternating order: one event with N prompts (one fetch
and decode, N requests sharing the frames) and N events of one prompt each, all submitted at
once (N fetches and decodes). Both go through ``caption_event`` with the worker's frame
source, the quality gate off. Prints the median wall times and their ratio, the frames each
side decoded, vLLM's multimodal cache hits for the side that met each video first (the
prompts of one video share its processed frames in the engine), and the load average (a
shared 2-core box moves single rounds a lot).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captionflow.captioning import Attempts, caption_event
from captionflow.config import Settings
from captionflow.schemas.events import VideoEvent
from captionflow.serving import (
    VllmBackend,
    build_tiny_model,
    prepare_vllm_environment,
    tiny_cpu_settings,
)
from captionflow.video.source import FrameSource
from tests.support.worker_fixtures import make_video

PROMPTS = ["Caption the video in one sentence.", "Describe the video in detail.",
           "List the objects that appear.", "What is the camera doing?",
           "What happens first and what happens last?", "Describe the colours."]


def _mm_cache() -> tuple[float, float]:
    """vLLM's multimodal cache (hits, queries) so far, from its Prometheus counters."""
    from prometheus_client import REGISTRY

    hits = queries = 0.0
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            if sample.name == "vllm:mm_cache_hits_total":
                hits += sample.value
            elif sample.name == "vllm:mm_cache_queries_total":
                queries += sample.value
    return hits, queries


async def _run(settings: Settings, backend: VllmBackend, frames: FrameSource,
               events: list[VideoEvent]) -> tuple[float, int]:
    started = time.perf_counter()
    results = await asyncio.gather(*(
        caption_event(e, clips=frames.open, caption=backend.caption, settings=settings,
                      attempts=Attempts(settings.worker)) for e in events))
    return time.perf_counter() - started, sum(r.frames_sampled for r in results)


async def main_async(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-prompts-"))
    prepare_vllm_environment(work / "vllm")
    model = args.model or str(build_tiny_model(work / "models"))
    serving = tiny_cpu_settings(model, temperature=0.0, max_tokens=args.max_tokens,
                                work_dir=work / "vllm")
    settings = Settings(serving=serving.model_dump(), worker={"quality_gate_retries": 0},
                        video={"allowed_roots": (work,), "fps": 2.0, "max_frames": args.frames,
                               "min_frames": 2, "min_pixels": 28 * 28 * 4,
                               "max_pixels": 224 * 224})
    prompts = PROMPTS[:args.prompts]
    backend = VllmBackend(settings.serving, settings.video)
    await backend.start()
    together_s, apart_s = [], []
    load_before = os.getloadavg()[0]
    try:
        async with FrameSource(settings.video) as frames:
            warm = make_video(work / "warm.mp4", 999, frames=60, fps=30, width=448, height=252)
            await _run(settings, backend, frames, [VideoEvent(id="warm", video=[str(warm)])])
            for r in range(args.rounds):
                video = str(make_video(work / f"v{r}.mp4", r, frames=args.source_frames,
                                       fps=30, width=448, height=252))
                one = [VideoEvent(id=f"one-{r}", video=[video], options={
                    "prompts": {f"p{i}": p for i, p in enumerate(prompts)}})]
                many = [VideoEvent(id=f"many-{r}-{i}", video=[video], options={"prompt": p})
                        for i, p in enumerate(prompts)]
                order = [(one, together_s), (many, apart_s)]
                for k, (events, out) in enumerate(order if r % 2 == 0 else order[::-1]):
                    cache_before = _mm_cache()
                    wall, decoded = await _run(settings, backend, frames, events)
                    out.append(wall)
                    if k == 0:
                        # The side that met this video first: its requests after the first
                        # found the video in vLLM's multimodal cache.
                        await asyncio.sleep(0.2)
                        hits, queries = (a - b for a, b in zip(_mm_cache(), cache_before,
                                                                strict=True))
                        side = "one event" if events is one else "separate events"
                        print(f"round {r}, {side} first: vLLM multimodal cache "
                              f"{hits:.0f} hits of {queries:.0f} queries")
                    if r == 0:
                        side = "one event" if events is one else f"{len(events)} events"
                        print(f"{side}: {decoded} frames decoded")
    finally:
        await backend.close()
    together, apart = statistics.median(together_s), statistics.median(apart_s)
    print(f"{len(prompts)} prompts, one event: median {together:.3f} s; "
          f"{len(prompts)} separate events: median {apart:.3f} s; "
          f"ratio separate/one {apart / together:.2f} (rounds={args.rounds}, "
          f"max_tokens={args.max_tokens}, load(1 min) {load_before:.2f} -> "
          f"{os.getloadavg()[0]:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: tiny model)")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--frames", type=int, default=8, help="frames sampled per video")
    parser.add_argument("--source-frames", type=int, default=300,
                        help="frames in each generated 30 fps source video")
    parser.add_argument("--max-tokens", type=int, default=32)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
