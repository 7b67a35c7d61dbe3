"""`captionflow run --ray` against `captionflow run` on the same clips, on this machine.

Both sides caption the same clips (10 s, 640x360, 25 fps, as bench_batch.py) with the tiny
random-weight Qwen2.5-VL on the vLLM CPU engine, the same settings, greedy, quality gate
off, caption cache off, each as a whole fresh process: ``captionflow run`` (one process: decoder children and
an in-process engine) and ``captionflow run --ray`` (a local Ray cluster started by the
command: decode tasks, one engine actor). Runs alternate (run first, then ray first, ...);
medians of wall time and the ratio ray/run are printed, with each Ray run's engine wait
(seconds its engine actor sat with no row to caption after it started) and whether the two
outputs hold the same captions.

Then the CPU stage alone: the same clips through ``captionflow.ray.decode_stage`` on a
local cluster given 1 CPU (one decode task at a time), against the same decode in one
process without Ray (``FrameSource``, one decoder process), alternating; clips/s per core
and the ratio.

    .venv/bin/python bench/bench_ray.py --clips 20 --pairs 2
    .venv/bin/python bench/bench_ray.py --clips 100 --pairs 1 --skip-decode
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_batch import make_clips, measure


def side_commands(rows: Path, config: Path, work: Path) -> dict[str, list[str]]:
    base = [sys.executable, "-m", "captionflow", "run", "--input", str(rows), "--no-resume",
            "--config", str(config)]
    return {"run": [*base, "--output", str(work / "run_out.json")],
            "ray": [*base, "--output", str(work / "ray_out.json"), "--ray"]}


def captions(path: Path) -> list[Any]:
    return [r.get("caption") for r in json.loads(path.read_text())]


def decode_settings(max_frames: int) -> Any:
    from captionflow.config import Settings

    return Settings(video={"decode_workers": 1, "max_frames": max_frames})


def decode_plain(clips: list[Path], settings: Any) -> float:
    """Clips/s of FrameSource in this process (one decoder process), one clip at a time."""
    from captionflow.batch.job import batch_video_settings
    from captionflow.video.source import FrameSource

    video = batch_video_settings(settings).video

    async def go() -> float:
        async with FrameSource(video) as source:
            await source.clips(str(clips[0]))  # the decoder process starts here
            started = time.perf_counter()
            for clip in clips:
                await source.clips(str(clip))
            return len(clips) / (time.perf_counter() - started)

    return asyncio.run(go())


def decode_on_ray(clips: list[Path], settings: Any) -> float:
    """Clips/s of the Ray decode stage on a 1-CPU local cluster (one task at a time), the
    frames materialized in the object store; a warm-up pass starts the decoder first."""
    import ray
    import ray.data

    from captionflow.ray import decode_stage

    ray.data.DataContext.get_current().enable_progress_bars = False
    stage = decode_stage(settings)
    items = [{"video": str(c)} for c in clips]

    def one_pass(rows: list[dict[str, str]]) -> float:
        started = time.perf_counter()
        ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // 4))
        out = ds.map_batches(stage, batch_format="pyarrow", batch_size=4,
                             num_cpus=1).materialize()
        assert out.count() == len(rows)
        return time.perf_counter() - started

    one_pass(items[:4])
    return len(items) / one_pass(items)


def bench_decode(clips: list[Path], pairs: int, max_frames: int) -> None:
    import ray

    settings = decode_settings(max_frames)
    tmp = tempfile.mkdtemp(prefix="cfray-", dir="/tmp")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _temp_dir=tmp)
    try:
        rates: dict[str, list[float]] = {"plain": [], "ray": []}
        for pair in range(pairs):
            order = ["plain", "ray"] if pair % 2 == 0 else ["ray", "plain"]
            for side in order:
                rate = (decode_plain if side == "plain" else decode_on_ray)(clips, settings)
                rates[side].append(rate)
                print(f"decode pair {pair} {side:5s}: {rate:5.2f} clips/s per core, load "
                      f"{os.getloadavg()[0]:.1f}", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"median CPU stage: ray {med['ray']:.2f} clips/s per core, plain FrameSource "
          f"{med['plain']:.2f}; ratio ray/plain {med['ray'] / med['plain']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=2,
                        help="runs of both sides, in alternating order")
    parser.add_argument("--skip-decode", action="store_true",
                        help="only run against run --ray, not the CPU stage alone")
    parser.add_argument("--skip-runs", action="store_true",
                        help="only the CPU stage alone")
    args = parser.parse_args()

    from captionflow.serving.engine_setup import prepare_vllm_environment, tiny_cpu_settings
    from captionflow.serving.tiny_model import build_tiny_model

    clips = make_clips(args.clips, args.seconds, args.fps)
    print(f"{args.clips} clips of {args.seconds:g} s 640x360 at {args.fps} fps, "
          f"{args.max_tokens} tokens, greedy; {os.cpu_count()} cores, load(1 min) "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    if not args.skip_runs:
        work = Path(tempfile.mkdtemp(prefix="cfray-bench-", dir="/tmp"))
        prepare_vllm_environment(work / "vllm")
        model = build_tiny_model(work / "models")
        serving = tiny_cpu_settings(model, temperature=0.0, max_tokens=args.max_tokens,
                                    work_dir=work / "vllm")
        config = work / "captionflow.json"
        config.write_text(json.dumps({
            "serving": serving.model_dump(mode="json", exclude={"openai_api_key"}),
            # No caption cache: every run asks the engine (a cached rerun is another figure).
            "worker": {"quality_gate_retries": 0}, "cache": {"enabled": False}}))
        rows = work / "rows.json"
        rows.write_text(json.dumps([{"video": [str(c)],
                                     "conversation": [{"from": "human", "value": ""}]}
                                    for c in clips]))
        commands = side_commands(rows, config, work)
        walls: dict[str, list[float]] = {"run": [], "ray": []}
        waits: list[float] = []
        for pair in range(args.pairs):
            order = ["run", "ray"] if pair % 2 == 0 else ["ray", "run"]
            for side in order:
                wall_s, peak, out = measure(commands[side], dict(os.environ))
                walls[side].append(wall_s)
                summary = json.loads(out.strip().splitlines()[-1])
                ray_part = summary.get("ray")
                if ray_part:
                    waits.append(ray_part["engine_wait_s"])
                wait = f", engine wait {ray_part['engine_wait_s']:.1f} s" if ray_part else ""
                print(f"pair {pair} {side:3s}: wall {wall_s:6.1f} s, peak RSS (sum, this "
                      f"process tree) {peak / 2**20:6.0f} MiB, captioned "
                      f"{summary['captioned']}/{summary['total']}, load "
                      f"{os.getloadavg()[0]:.1f}{wait}", flush=True)
        a, b = captions(work / "run_out.json"), captions(work / "ray_out.json")
        same = sum(x == y and isinstance(x, str) for x, y in zip(a, b, strict=True))
        wall = {k: statistics.median(v) for k, v in walls.items()}
        print(f"captions equal (greedy): {same}/{len(a)}")
        print(f"median wall: run {wall['run']:.1f} s, run --ray {wall['ray']:.1f} s; overhead "
              f"ratio ray/run {wall['ray'] / wall['run']:.2f}; Ray engine wait median "
              f"{statistics.median(waits):.1f} s")
    if not args.skip_decode:
        bench_decode(clips, max(args.pairs, 3), max_frames=768)


if __name__ == "__main__":
    main()
