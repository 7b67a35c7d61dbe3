"""Batch mode against the seed's approach, on the seed's own job.

Both sides caption the same 20 ten-second 640x360 clips with the same engine settings, the
same 64-token greedy budget and the same prompt (DataFlow's default), each as a whole fresh
process:

- **seed**: what DataFlow-MM's pipeline does, written here (qwen-vl-utils is not installed):
  start the offline ``vllm.LLM``, read every row's video with qwen-vl-utils' sampling
  rules (decode every frame, as its torchvision reader does; 2 fps, an even count within
  4..768 frames, indices ``linspace(0, n - 1, k).round()``; frames resized bicubic with
  antialiasing to multiples of 28 inside its pixel bounds, as float32), then one
  ``LLM.generate`` over all rows. The video goes in as vLLM 0.32 needs it, a ``(frames,
  metadata)`` tuple: the one patch the seed needs there.
- **captionflow**: ``python -m captionflow run`` on the same rows (quality gate off, so no
  truncated caption is asked for again: the random-weight model truncates every one).

Runs alternate (seed first, then captionflow first, ...) and the medians are compared: wall
time of the whole process, and peak RSS summed over the process and all its children
(the engine core, decoder processes), sampled every 50 ms with psutil. The load average is
printed; on this shared 2-core box single runs move a lot.

    .venv/bin/python bench/bench_batch.py --pairs 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from _common import tree_rss_bytes

CLIP_DIR = Path(tempfile.gettempdir()) / "captionflow-bench-batch-clips"

# qwen-vl-utils' constants (vision_process.py).
IMAGE_FACTOR = 28
FRAME_FACTOR = 2
FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = 24576 * 28 * 28


def _round_by(x: float, f: int) -> int:
    return round(x / f) * f


def _ceil_by(x: float, f: int) -> int:
    return math.ceil(x / f) * f


def _floor_by(x: float, f: int) -> int:
    return math.floor(x / f) * f


def smart_resize(height: int, width: int, factor: int, min_pixels: int,
                 max_pixels: int) -> tuple[int, int]:
    h_bar = max(factor, _round_by(height, factor))
    w_bar = max(factor, _round_by(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = _floor_by(height / beta, factor)
        w_bar = _floor_by(width / beta, factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = _ceil_by(height * beta, factor)
        w_bar = _ceil_by(width * beta, factor)
    return h_bar, w_bar


def smart_nframes(total_frames: int, video_fps: float) -> int:
    min_frames = _ceil_by(FPS_MIN_FRAMES, FRAME_FACTOR)
    max_frames = _floor_by(min(FPS_MAX_FRAMES, total_frames), FRAME_FACTOR)
    nframes = total_frames / video_fps * FPS
    nframes = min(min(max(nframes, min_frames), max_frames), total_frames)
    return _floor_by(nframes, FRAME_FACTOR)


def read_video_seed(path: str) -> tuple[Any, dict[str, Any]]:
    """qwen-vl-utils' ``fetch_video`` with its torchvision reader: every frame decoded into
    memory, then the sampled ones resized to float32 ``(T, C, H, W)``."""
    import av
    import numpy as np
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as tvf

    with av.open(path) as container:
        stream = container.streams.video[0]
        video_fps = float(stream.average_rate)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    video = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)  # T, C, H, W uint8
    total = video.shape[0]
    nframes = smart_nframes(total, video_fps)
    idx = torch.linspace(0, total - 1, nframes).round().long()
    video = video[idx]
    height, width = video.shape[2:]
    max_pixels = max(min(VIDEO_MAX_PIXELS, VIDEO_TOTAL_PIXELS / nframes * FRAME_FACTOR),
                     int(VIDEO_MIN_PIXELS * 1.05))
    rh, rw = smart_resize(height, width, IMAGE_FACTOR, VIDEO_MIN_PIXELS, max_pixels)
    video = tvf.resize(video, [rh, rw], interpolation=InterpolationMode.BICUBIC,
                       antialias=True).float()
    sample_fps = nframes / max(total, 1e-6) * video_fps
    metadata = {"fps": sample_fps, "duration": total / video_fps, "total_num_frames": nframes,
                "frames_indices": list(range(nframes)), "video_backend": "torchvision",
                "do_sample_frames": False}
    return video, metadata


# --- the two sides, each run as its own process ---------------------------------------------


def seed_side(rows_path: Path, settings_path: Path, out_path: Path) -> None:
    from dataclasses import asdict

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from captionflow.config import ServingSettings
    from captionflow.serving.engine_setup import engine_args
    from captionflow.serving.prompt import build_messages, render_prompt

    settings = ServingSettings(**json.loads(settings_path.read_text()))
    args = asdict(engine_args(settings))
    # DataFlow builds its LLM when the serving object is made, before the operator runs.
    llm = LLM(**{k: v for k, v in args.items() if k in _LLM_KEYS})
    try:
        rows = json.loads(rows_path.read_text())
        started = time.perf_counter()
        videos = [read_video_seed(row["video"][0]) for row in rows]
        read_s = time.perf_counter() - started
        prompt = render_prompt(AutoTokenizer.from_pretrained(settings.model),
                               build_messages(None, system_prompt=settings.system_prompt,
                                              default_prompt=settings.default_prompt))
        params = SamplingParams(temperature=settings.temperature, top_p=settings.top_p,
                                max_tokens=settings.max_tokens)
        started = time.perf_counter()
        outputs = llm.generate([{"prompt": prompt, "multi_modal_data": {"video": v}}
                                for v in videos], params, use_tqdm=False)
        generate_s = time.perf_counter() - started
        for row, out in zip(rows, outputs):
            row["caption"] = out.outputs[0].text
        out_path.write_text(json.dumps(rows))
        print(json.dumps({"read_s": read_s, "generate_s": generate_s,
                          "tokens": sum(len(o.outputs[0].token_ids) for o in outputs)}))
    finally:
        llm.llm_engine.engine_core.shutdown()


_LLM_KEYS = {"model", "dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
             "enforce_eager", "kv_cache_memory_bytes", "limit_mm_per_prompt",
             "tensor_parallel_size", "gpu_memory_utilization", "mm_processor_kwargs",
             "trust_remote_code", "download_dir", "disable_log_stats"}


# --- the driver ------------------------------------------------------------------------------


def measure(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS summed over the process tree, and stdout."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            peak = max(peak, tree_rss_bytes(root))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall_s = time.perf_counter() - started
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} exited {proc.returncode}:\n{err[-4000:]}")
    return wall_s, peak, out


def make_clips(count: int, seconds: float, fps: int) -> list[Path]:
    from captionflow.samples import SCENES, make_sample_video

    CLIP_DIR.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = CLIP_DIR / f"clip{i:02d}_{seconds:g}s_{fps}fps_640x360.mp4"
        if not path.exists():
            _, background, square = SCENES[i % len(SCENES)]
            shifted = tuple((c + 37 * i) % 256 for c in background)
            make_sample_video(path, shifted, square, seconds=seconds, fps=fps,  # type: ignore[arg-type]
                              width=640, height=360)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=2,
                        help="runs of both sides, in alternating order")
    parser.add_argument("--side", choices=["seed"], help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--settings", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "seed":
        seed_side(args.rows, args.settings, args.out)
        return

    from captionflow.serving.engine_setup import prepare_vllm_environment, tiny_cpu_settings
    from captionflow.serving.tiny_model import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="captionflow-bench-batch-"))
    prepare_vllm_environment(work / "vllm")
    model = build_tiny_model(work / "models")
    serving = tiny_cpu_settings(model, temperature=0.0, max_tokens=args.max_tokens,
                                work_dir=work / "vllm")
    serving_json = serving.model_dump(mode="json", exclude={"openai_api_key"})
    settings_path = work / "serving.json"
    settings_path.write_text(json.dumps(serving_json))
    config_path = work / "captionflow.json"
    config_path.write_text(json.dumps({"serving": serving_json,
                                       "worker": {"quality_gate_retries": 0}}))
    clips = make_clips(args.clips, args.seconds, args.fps)
    rows_path = work / "rows.json"
    rows_path.write_text(json.dumps([{"video": [str(c)],
                                      "conversation": [{"from": "human", "value": ""}]}
                                     for c in clips]))
    env = dict(os.environ)
    # The seed as it runs without captionflow installed: no captionflow vLLM plugin (its
    # fast video preprocessing would otherwise reach the seed's engine too).
    envs = {"seed": {**env, "VLLM_PLUGINS": ""}, "captionflow": env}
    here = Path(__file__).resolve()
    commands = {
        "seed": [sys.executable, str(here), "--side", "seed", "--rows", str(rows_path),
                 "--settings", str(settings_path), "--out", str(work / "seed_out.json")],
        "captionflow": [sys.executable, "-m", "captionflow", "run", "--input", str(rows_path),
                        "--output", str(work / "cf_out.json"), "--no-resume",
                        "--config", str(config_path)],
    }
    print(f"{args.clips} clips of {args.seconds:g} s 640x360 at {args.fps} fps, "
          f"{args.max_tokens} tokens, greedy; {os.cpu_count()} cores, load(1 min) "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    walls: dict[str, list[float]] = {"seed": [], "captionflow": []}
    peaks: dict[str, list[int]] = {"seed": [], "captionflow": []}
    for pair in range(args.pairs):
        order = ["seed", "captionflow"] if pair % 2 == 0 else ["captionflow", "seed"]
        for side in order:
            wall_s, peak, out = measure(commands[side], envs[side])
            walls[side].append(wall_s)
            peaks[side].append(peak)
            detail = next((line for line in reversed(out.splitlines())
                           if line.startswith("{")), "")
            print(f"pair {pair} {side:11s}: wall {wall_s:6.1f} s, peak RSS (sum) "
                  f"{peak / 2**20:7.0f} MiB, load {os.getloadavg()[0]:.1f}  {detail}",
                  flush=True)
    cf_out = json.loads((work / "cf_out.json").read_text())
    captioned = sum(1 for r in cf_out if isinstance(r.get("caption"), str))
    wall = {k: statistics.median(v) for k, v in walls.items()}
    peak = {k: statistics.median(v) for k, v in peaks.items()}
    print(f"captionflow captioned {captioned}/{len(cf_out)} rows")
    print(f"median wall: seed {wall['seed']:.1f} s, captionflow {wall['captionflow']:.1f} s; "
          f"ratio captionflow/seed {wall['captionflow'] / wall['seed']:.2f} (goal <= 0.8)")
    print(f"median peak RSS (sum): seed {peak['seed'] / 2**20:.0f} MiB, captionflow "
          f"{peak['captionflow'] / 2**20:.0f} MiB; ratio "
          f"{peak['captionflow'] / peak['seed']:.2f} (goal <= 0.6)")


if __name__ == "__main__":
    main()
