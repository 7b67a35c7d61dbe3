"""``video.decode_device=cuda`` against the CPU decoders: the check and the benchmark in one
short run, for an NVIDIA host (``bench/gpu_decode_check.sh`` sets it up there).

For the three clip classes of ``bench/bench_preprocess.py`` (10 s 448p at 2 fps, 10 s 1080p
at 2 fps, 120 s 1080p at 0.5 fps; x264 veryfast, 25 fps, GOP 250, encoded here with PyAV so
the host needs no ffmpeg CLI), with the default sampling policy:

- **check**: decode the sampled frames on each device; the GPU pass must report
  ``device == "cuda"`` with no fallback, and its frames must match the CPU path's within
  codec tolerance (mean absolute difference at most 1.0 of 255; PSNR printed). Then one
  clip through ``FrameSource`` (a decoder process that opens the device at start, under
  RLIMIT_DATA) to check the process path.
- **benchmark**: CPU-seconds (``time.process_time``: this process, codec threads included,
  the driver's threads too) and wall seconds per clip for decode + sample + resize on each
  device, alternating devices, medians of ``--repeats``; printed as ratios against the CPU
  path measured in the same run, and "clips/s one 16-core host can feed" from the
  CPU-seconds (decode only; bench_preprocess.py adds the multimodal processor's share).

Exit status 1 when the check fails. ``--json PATH`` writes the figures.

    python bench/bench_gpu_decode.py --repeats 3 --json "$OUT/gpu_decode.json"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captionflow.config import VideoSettings  # noqa: E402
from captionflow.errors import DecodeDeviceUnavailableError  # noqa: E402
from captionflow.video.decode import check_device, decode_frames  # noqa: E402
from captionflow.video.demux import probe  # noqa: E402
from captionflow.video.sampling import SamplingPolicy  # noqa: E402
from captionflow.video.source import FrameSource  # noqa: E402

CLIP_DIR = Path(tempfile.gettempdir()) / "captionflow-bench-gpu-decode"
HOST_CORES = 16
CLASSES = [  # name, (width, height), seconds, sampling fps
    ("10 s 448p, 2 fps", (796, 448), 10, 2.0),
    ("10 s 1080p, 2 fps", (1920, 1080), 10, 2.0),
    ("120 s 1080p, 0.5 fps", (1920, 1080), 120, 0.5),
]
MAX_MEAN_ABS_DIFF = 1.0


def make_clip(size: tuple[int, int], seconds: int) -> Path:
    """x264 veryfast, 25 fps, GOP 250, of moving gradients over fixed noise (detail the
    encoder must keep, motion it must predict)."""
    w, h = size
    path = CLIP_DIR / f"clip_{w}x{h}_{seconds}s.mp4"
    if path.exists():
        return path
    CLIP_DIR.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 48, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    tmp = path.with_suffix(".part.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=25,
                                      options={"preset": "veryfast", "g": "250"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(25 * seconds):
            base = ((xx + 7 * i) % 256).astype(np.uint8)
            frame = np.stack([base, ((yy + 3 * i) % 256).astype(np.uint8),
                              ((xx + yy + i) % 256).astype(np.uint8)], axis=-1)
            frame = frame // 2 + noise
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.rename(path)
    return path


def timed(fn: Any) -> tuple[Any, float, float]:
    cpu0, wall0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - cpu0, time.perf_counter() - wall0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def run_class(name: str, size: tuple[int, int], seconds: int, fps: float,
              repeats: int, device: str) -> dict[str, Any]:
    path = make_clip(size, seconds)
    settings = VideoSettings(fps=fps, max_duration_s=3600)
    index = probe(path, max_duration_s=settings.max_duration_s)
    policy = SamplingPolicy.from_settings(settings)
    facts = index.facts
    indices, _ = policy.frame_indices(facts.total_frames, facts.source_fps)
    height, width = policy.frame_size(facts.height, facts.width, len(indices))

    def decode(on: str) -> tuple[np.ndarray, Any]:
        return decode_frames(path, index, indices, height=height, width=width, device=on)

    samples: dict[str, list[tuple[float, float]]] = {"cpu": [], device: []}
    frames: dict[str, np.ndarray] = {}
    stats: dict[str, Any] = {}
    decode(device)  # warm: the device's first open, the codec's first use
    for r in range(repeats):
        for on in (("cpu", device) if r % 2 == 0 else (device, "cpu")):
            (out, st), cpu_s, wall_s = timed(lambda on=on: decode(on))
            samples[on].append((cpu_s, wall_s))
            frames[on], stats[on] = out, st
    diff = np.abs(frames[device].astype(np.int16) - frames["cpu"].astype(np.int16))
    med = {on: (statistics.median(c for c, _ in s), statistics.median(w for _, w in s))
           for on, s in samples.items()}
    ok = (stats[device].device == device and not stats[device].device_fallback
          and float(diff.mean()) <= MAX_MEAN_ABS_DIFF)
    return {
        "class": name, "frames": len(indices), "size": f"{width}x{height}",
        "device": stats[device].device, "device_fallback": stats[device].device_fallback,
        "mean_abs_diff": round(float(diff.mean()), 3), "max_abs_diff": int(diff.max()),
        "psnr_db": round(psnr(frames[device], frames["cpu"]), 2),
        "cpu_ms": {on: round(c * 1000, 1) for on, (c, _) in med.items()},
        "wall_ms": {on: round(w * 1000, 1) for on, (_, w) in med.items()},
        "cpu_ratio": round(med[device][0] / med["cpu"][0], 3),
        "wall_ratio": round(med[device][1] / med["cpu"][1], 3),
        "host_clips_per_s": {on: round(HOST_CORES / c, 1) for on, (c, _) in med.items()},
        "ok": ok,
    }


async def through_decoder_process(device: str) -> dict[str, Any]:
    path = make_clip(CLASSES[0][1], CLASSES[0][2])
    settings = VideoSettings(allowed_roots=(CLIP_DIR,), decode_device=device, decode_workers=1)
    async with FrameSource(settings) as source:
        clips = await source.clips(str(path))
    extra = clips[0].extra
    return {"decode_device": extra["decode_device"], "device_fallback": extra["device_fallback"],
            "frames": int(clips[0].frames.shape[0]),
            "ok": extra["decode_device"] == device and not extra["device_fallback"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--classes", type=int, default=len(CLASSES),
                        help="only the first N clip classes")
    parser.add_argument("--allow-fallback", action="store_true",
                        help="run on even where the device cannot be opened (to try this "
                        "script on a host without a GPU; every row then fails the check)")
    args = parser.parse_args()
    print(f"PyAV {av.__version__}, FFmpeg {av.library_versions['libavcodec']}, "
          f"hwdevices {av.codec.hwaccel.hwdevices_available()}", flush=True)
    try:
        # Held for the whole run, as a decoder process holds it: every decode attaches to
        # the device's primary context instead of creating it again.
        held_device = check_device(args.device)  # noqa: F841
    except DecodeDeviceUnavailableError as e:
        print(f"FAIL: {e}")
        if not args.allow_fallback:
            return 1
    results = []
    for name, size, seconds, fps in CLASSES[:args.classes]:
        row = run_class(name, size, seconds, fps, args.repeats, args.device)
        results.append(row)
        print(json.dumps(row), flush=True)
    try:
        process = asyncio.run(through_decoder_process(args.device))
    except DecodeDeviceUnavailableError as e:
        process = {"error": str(e), "ok": False}
    print("decoder process:", json.dumps(process))

    print(f"\n| per clip | {' | '.join(r['class'] for r in results)} |")
    print("|---|" + "---|" * len(results))
    for label, key in (("CPU-ms, cpu", ("cpu_ms", "cpu")), ("CPU-ms, " + args.device,
                       ("cpu_ms", args.device)), ("wall ms, cpu", ("wall_ms", "cpu")),
                       ("wall ms, " + args.device, ("wall_ms", args.device))):
        print(f"| {label} | " + " | ".join(str(r[key[0]][key[1]]) for r in results) + " |")
    print("| CPU-s ratio gpu/cpu | " + " | ".join(str(r["cpu_ratio"]) for r in results) + " |")
    print("| wall ratio gpu/cpu | " + " | ".join(str(r["wall_ratio"]) for r in results) + " |")
    print("| mean abs diff / PSNR | " + " | ".join(
        f"{r['mean_abs_diff']} / {r['psnr_db']} dB" for r in results) + " |")
    ok = all(r["ok"] for r in results) and process["ok"]
    if args.json:
        args.json.write_text(json.dumps({"classes": results, "decoder_process": process,
                                         "ok": ok}, indent=2))
    print("\nOK" if ok else "\nFAIL: see the rows with ok=false")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
