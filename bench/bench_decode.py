"""Decode benchmark: captionflow's sampler vs the ffmpeg CLI vs decode-everything-then-pick.

    .venv/bin/python bench/bench_decode.py [--clips 10s720p,120s1080p,600s1080p] [--workdir DIR]

Clips are H.264 made once with the ffmpeg CLI (testsrc2, realistic bitrates, long GOPs) and
cached in the work dir. Every variant runs in its own subprocess so its peak RSS is its own.
``captionflow`` is the worker's path: ``FrameSource``, probe and decode in a decoder child
process (started before the clock, as in a running worker), frames back through shared
memory; ``in-process`` is the same sampler called in the benchmark's own process.
Prints output frames/s, wall time relative to the ffmpeg CLI measured in the same run, peak
RSS, RSS beyond the returned frames, and whether the frames are exactly the policy's.
Numbers, not assertions: tests never check timings.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

CLIPS = {  # name: (seconds, width, height, fps, gop, bitrate)
    "10s720p": (10, 1280, 720, 30, 60, "4.5M"),
    "120s1080p": (120, 1920, 1080, 30, 250, "8M"),
    "600s1080p": (600, 1920, 1080, 30, 250, "8M"),
}
RUNS = {  # clip: sampling rates to try
    "10s720p": (2.0,), "120s1080p": (2.0, 0.1), "600s1080p": (2.0,)}
OUT_W, OUT_H = 448, 252  # FACTS's comparison size: max_pixels = 144 * 28 * 28 gives it
MAX_PIXELS = 144 * 28 * 28


def make_clip(workdir: Path, name: str) -> Path:
    seconds, w, h, fps, gop, rate = CLIPS[name]
    path = (workdir / f"{name}.mp4").resolve()
    if not path.exists():
        tmp = path.with_suffix(".tmp.mp4")
        subprocess.run(
            ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
             f"testsrc2=size={w}x{h}:rate={fps}", "-t", str(seconds), "-c:v", "libx264",
             "-preset", "veryfast", "-b:v", rate, "-maxrate", rate, "-bufsize", rate,
             "-g", str(gop), "-keyint_min", str(gop), "-sc_threshold", "0",
             "-pix_fmt", "yuv420p", str(tmp)], check=True)
        tmp.rename(path)
    return path


def child(variant: str, path: str, fps: float) -> dict:
    """Runs inside the subprocess: one variant, one clip, one rate."""
    import numpy as np

    from captionflow.config import VideoSettings
    from captionflow.video.demux import probe
    from captionflow.video.sampling import SamplingPolicy
    from captionflow.video.source import load_clips

    settings = VideoSettings(allowed_roots=(Path(path).parent,), max_pixels=MAX_PIXELS,
                             fps=fps, max_duration_s=10_000)
    base_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    source = None
    if variant == "captionflow":
        import asyncio

        from captionflow.video.source import FrameSource

        loop = asyncio.new_event_loop()
        source = FrameSource(settings)
        # A running worker's decoder process is already up: start it outside the clock.
        loop.run_until_complete(source.pool.probe(path=Path(path), max_duration_s=10_000))
        base_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    if source is not None:
        [clip] = loop.run_until_complete(source.clips(path))
        frames, indices = clip.frames, list(clip.frame_indices)
        extra = {k: clip.extra[k] for k in ("seeks", "packets_decoded", "frames_decoded")}
        [pid] = source.pool.pids()
        extra["child_rss_mb"] = source.pool.peak_rss_bytes[pid] / 2**20
    elif variant == "in-process":
        [clip] = load_clips(path, settings)
        frames, indices = clip.frames, list(clip.frame_indices)
        extra = {k: clip.extra[k] for k in ("seeks", "packets_decoded", "frames_decoded")}
    else:  # decode everything, keep the sampled frames
        import av

        index = probe(Path(path), max_duration_s=10_000)
        policy = SamplingPolicy.from_settings(settings)
        indices, _ = policy.frame_indices(index.facts.total_frames, index.facts.source_fps)
        h, w = policy.frame_size(index.facts.height, index.facts.width, len(indices))
        wanted = set(indices)
        picked = {}
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    picked[i] = frame.reformat(width=w, height=h, format="rgb24").to_ndarray()
        frames = np.stack([picked[i] for i in indices])
        extra = {}
    wall_s = time.perf_counter() - started
    digest = [int(f[::7, ::7].sum()) for f in frames]
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # shm frames touched above
    if source is not None:
        loop.run_until_complete(source.close())
        loop.close()
    return {"wall_s": wall_s, "frames": len(indices), "indices": indices, "digest": digest,
            "shape": list(frames.shape), "peak_rss_mb": peak_kb / 1024,
            "beyond_frames_mb": (peak_kb - base_rss_kb) / 1024 - frames.nbytes / 2**20, **extra}


def run_child(variant: str, path: Path, fps: float) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", variant, str(path), str(fps)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_ffmpeg(path: Path, fps: float) -> dict:
    started = time.perf_counter()
    proc = subprocess.Popen(
        ["ffmpeg", "-v", "error", "-threads", "0", "-i", str(path), "-vf",
         f"fps={fps},scale={OUT_W}:{OUT_H}", "-pix_fmt", "rgb24", "-f", "rawvideo", "-"],
        stdout=subprocess.PIPE)
    assert proc.stdout is not None
    total = 0
    while chunk := proc.stdout.read(1 << 20):
        total += len(chunk)
    _, _, usage = os.wait4(proc.pid, 0)
    wall_s = time.perf_counter() - started
    peak_kb = usage.ru_maxrss
    return {"wall_s": wall_s, "frames": total // (OUT_W * OUT_H * 3), "peak_rss_mb": peak_kb / 1024}


def _settings(path: str):
    from captionflow.config import VideoSettings

    return VideoSettings(allowed_roots=(Path(path).parent,), max_pixels=MAX_PIXELS)


def _decode_once(path: str) -> int:
    from captionflow.video.source import load_clips

    return load_clips(path, _settings(path))[0].num_frames


def pool_comparison(path: Path, jobs: int = 2, rounds: int = 3) -> None:
    """Threads (the sampler in a thread pool) vs the worker's decoder processes
    (FrameSource) for ``jobs`` concurrent decodes, best of ``rounds``."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from captionflow.video.source import FrameSource

    _decode_once(str(path))  # warm the page cache and imports
    best: dict[str, float] = {}
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(jobs):
            _decode_once(str(path))
        best["sequential"] = min(best.get("sequential", 1e9), time.perf_counter() - started)
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            started = time.perf_counter()
            list(pool.map(_decode_once, [str(path)] * jobs))
            best["threads"] = min(best.get("threads", 1e9), time.perf_counter() - started)

        async def processes() -> float:
            settings = _settings(str(path)).model_copy(update={"decode_workers": jobs})
            async with FrameSource(settings) as source:
                # Start the decoder processes outside the clock, as in a running worker.
                await asyncio.gather(*(source.pool.probe(path=path, max_duration_s=1e4)
                                       for _ in range(jobs)))
                started = time.perf_counter()
                await asyncio.gather(*(source.clips(str(path)) for _ in range(jobs)))
                return time.perf_counter() - started

        best["processes"] = min(best.get("processes", 1e9), asyncio.run(processes()))
    seq = best["sequential"]
    for label in ("threads", "processes"):
        print(f"{jobs} decodes of {path.name}: {label} {best[label]:.2f} s, "
              f"sequential {seq:.2f} s ({best[label] / seq:.2f}x), best of {rounds}", flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3], float(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", default="10s720p,120s1080p")
    parser.add_argument("--workdir", type=Path, default=Path(".work/bench"))
    parser.add_argument("--pool", action="store_true",
                        help="only compare threads and processes on the 10 s clip")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.pool:
        pool_comparison(make_clip(args.workdir, "10s720p"))
        return
    print(f"{'clip':10} {'fps':>4} {'variant':12} {'frames':>6} {'wall_s':>7} {'out_fps':>8} "
          f"{'x_ffmpeg':>8} {'rss_mb':>7} {'beyond_mb':>9}  notes")
    for name in args.clips.split(","):
        path = make_clip(args.workdir, name)
        for fps in RUNS[name]:
            ref = run_ffmpeg(path, fps)
            rows = {"ffmpeg-cli": ref, "decode-all": run_child("decode-all", path, fps),
                    "in-process": run_child("in-process", path, fps),
                    "captionflow": run_child("captionflow", path, fps)}
            for variant, r in rows.items():
                notes = ""
                if variant in ("captionflow", "in-process"):
                    same = rows["decode-all"]["indices"] == r["indices"] and \
                        rows["decode-all"]["digest"] == r["digest"]
                    notes = (f"exact={same} seeks={r['seeks']} packets={r['packets_decoded']} "
                             f"decoded={r['frames_decoded']}")
                if "child_rss_mb" in r:
                    notes += f" decoder_rss_mb={r['child_rss_mb']:.0f}"
                beyond = f"{r['beyond_frames_mb']:9.0f}" if "beyond_frames_mb" in r else " " * 9
                print(f"{name:10} {fps:4} {variant:12} {r['frames']:6d} {r['wall_s']:7.2f} "
                      f"{r['frames'] / r['wall_s']:8.1f} {r['wall_s'] / ref['wall_s']:8.2f} "
                      f"{r['peak_rss_mb']:7.0f} {beyond}  {notes}", flush=True)


if __name__ == "__main__":
    main()
