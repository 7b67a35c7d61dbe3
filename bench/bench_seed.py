"""The DataFlow drop-in against the seed's own code, on the seed's own example script.

- **seed**: DataFlow-MM's ``VideoToCaptionGenerator``, ``LocalModelVLMServing_vllm`` and
  ``FileStorage``, vendored in bench/seed_side/ with a patch at each of the four points
  where vLLM 0.32's CPU engine refuses them (docs/batch.md lists them).
- **captionflow**: ``captionflow.dataflow``'s classes of the same names.
- **the job**: the seed document's example script, the same text on both sides but for its
  three imports, with the model and the token budget replaced by the tiny model's path and
  ``--max-tokens`` on both; N clips of 10 s at 640x360 named by absolute path.
- **settings**: ``equal`` gives captionflow the seed side's engine arguments;
  ``none`` gives captionflow nothing (its engine plan chooses).

Every run is a fresh process, the sides alternate (seed first, then captionflow first, ...),
and medians are compared: wall time, the peak RSS of the largest process (its VmHWM) and
the peak of the RSS summed over the process tree (sampled every 50 ms). ``--profile`` runs
each side once more through bench/seed_timeline.py and prints when each stage was reached.

    .venv/bin/python bench/bench_seed.py --clips 20 --runs 3 --settings equal none
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
from bench_batch import make_clips

from captionflow.serving.tiny_model import build_tiny_model

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SEED_SIDE = BENCH / "seed_side"
EXAMPLE = REPO / "examples" / "video_caption_pipeline.py"
SEED_IMPORTS = ("from dataflow.operators.core_vision import VideoToCaptionGenerator\n"
                "from dataflow.serving import LocalModelVLMServing_vllm\n"
                "from dataflow.utils.storage import FileStorage\n")
# The seed side's CPU engine arguments (patch 1), and so captionflow's with "equal".
SEED_ENGINE_ARGS: dict[str, Any] = {"dtype": "float32", "enforce_eager": True,
                                    "kv_cache_memory_bytes": 256 << 20, "max_num_seqs": 8,
                                    "max_num_batched_tokens": 51200}


def script_text(side: str, model: Path, max_tokens: int) -> str:
    text = EXAMPLE.read_text()
    if side == "seed":
        text = re.sub(r"(?m)^from captionflow\.dataflow import .*\n", "", text)
        text = SEED_IMPORTS + text
    text = text.replace('"Qwen/Qwen2.5-VL-7B-Instruct"', repr(str(model)))
    return text.replace("vllm_max_tokens=2048", f"vllm_max_tokens={max_tokens}")


def side_env(side: str, settings: str, work: Path, cwd: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CAPTIONFLOW_", "VLLM_", "SEEDBENCH_"))}
    # A fresh user cache dir per run: captionflow's caption cache (on by default) would
    # otherwise answer every run after the first without the engine.
    env["XDG_CACHE_HOME"] = str(cwd / "user-cache")
    vllm_dir = Path(tempfile.mkdtemp(prefix=f"sb-{side[:2]}-", dir="/tmp"))
    env.update({"VLLM_CACHE_ROOT": str(work / "vllm-cache"), "VLLM_RPC_BASE_PATH": str(vllm_dir),
                "TMPDIR": str(vllm_dir), "VLLM_HOST_IP": "127.0.0.1"})
    if side == "seed":
        # Without captionflow on the path, and without its vLLM plugin.
        env.update({"PYTHONPATH": str(SEED_SIDE), "VLLM_PLUGINS": "",
                    "SEEDBENCH_ENGINE_ARGS": json.dumps(SEED_ENGINE_ARGS)})
    else:
        env["PYTHONPATH"] = str(REPO)
        if settings == "equal":
            for key, value in SEED_ENGINE_ARGS.items():
                env[f"CAPTIONFLOW_SERVING__{key.upper()}"] = \
                    value if isinstance(value, str) else json.dumps(value)
    return env


def project(work: Path, side: str, clips: list[Path], model: Path, max_tokens: int) -> Path:
    """A fresh working directory laid out as the seed's example expects."""
    where = Path(tempfile.mkdtemp(prefix=f"{side}-", dir=work))
    entry = where / "dataflow" / "example" / "video_caption" / "sample_data.json"
    entry.parent.mkdir(parents=True)
    entry.write_text(json.dumps([{"video": [str(c)],
                                  "conversation": [{"from": "human", "value": ""}]}
                                 for c in clips]))
    (where / "video_caption_pipeline.py").write_text(script_text(side, model, max_tokens))
    return where


def _hwm_bytes(proc: psutil.Process) -> int:
    try:
        with open(f"/proc/{proc.pid}/status", encoding="ascii") as f:
            line = next(x for x in f if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        return 0


def measure(cmd: list[str], cwd: Path, env: dict[str, str]) -> dict[str, Any]:
    """Wall seconds, the largest process's peak RSS and the peak summed RSS of the tree."""
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, env={**env, "SEEDBENCH_T0": repr(started)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_sum, hwm = 0, {}
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_sum
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                procs = []
            for p in procs:
                hwm[p.pid] = max(hwm.get(p.pid, 0), _hwm_bytes(p))
            peak_sum = max(peak_sum, tree_rss_bytes(root))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall_s = time.time() - started
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} in {cwd} exited {proc.returncode}:\n{err[-4000:]}")
    # The seed writes its rewritten conversations as step 1 and its captions as step 2.
    steps = sorted((cwd / "cache").glob("video_caption_step*.json"))
    output = json.loads(steps[-1].read_text()) if steps else []
    captioned = sum(1 for r in output if isinstance(r.get("caption"), str) and r["caption"])
    return {"wall_s": wall_s, "largest": max(hwm.values(), default=0), "sum": peak_sum,
            "captioned": captioned, "rows": len(output),
            "lines": len([x for x in (out + err).splitlines() if x.strip()])}


def run_pairs(args: argparse.Namespace, work: Path, clips: list[Path], model: Path,
              settings: str) -> dict[str, dict[str, float]]:
    results: dict[str, list[dict[str, Any]]] = {"seed": [], "captionflow": []}
    for n in range(args.runs):
        order = ["seed", "captionflow"] if n % 2 == 0 else ["captionflow", "seed"]
        for side in order:
            cwd = project(work, side, clips, model, args.max_tokens)
            r = measure([sys.executable, "video_caption_pipeline.py"], cwd,
                        side_env(side, settings, work, cwd))
            results[side].append(r)
            print(f"  {settings:5s} run {n} {side:11s}: wall {r['wall_s']:6.1f} s, largest "
                  f"{r['largest'] / 2**20:6.0f} MiB, tree {r['sum'] / 2**20:6.0f} MiB, "
                  f"captioned {r['captioned']}/{r['rows']}, {r['lines']} output lines, "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    return {side: {key: statistics.median(r[key] for r in runs)
                   for key in ("wall_s", "largest", "sum")}
            for side, runs in results.items()}


def profile(work: Path, clips: list[Path], model: Path, args: argparse.Namespace,
            settings: str) -> None:
    stages = ["imports", "engine_start", "engine_ready", "first_decoded", "first_token",
              "last_written", "exit"]
    rows = {}
    for side in args.sides:
        cwd = project(work, side, clips, model, args.max_tokens)
        timeline = cwd / "timeline.jsonl"
        env = {**side_env(side, settings, work, cwd), "SEEDBENCH_TIMELINE": str(timeline)}
        r = measure([sys.executable, str(BENCH / "seed_timeline.py"),
                     "video_caption_pipeline.py"], cwd, env)
        marks: dict[str, float] = {"exit": r["wall_s"]}
        for line in timeline.read_text().splitlines():
            m = json.loads(line)
            marks.setdefault(m["stage"], m["t"]) if m["stage"] != "last_written" \
                else marks.__setitem__(m["stage"], m["t"])
        rows[side] = marks
        if r["captioned"] != r["rows"]:
            print(f"  profiled {side} run captioned {r['captioned']} of {r['rows']} rows")
    print(f"  timeline ({settings} settings), seconds from launch:")
    print("    " + " ".join(f"{s:>13s}" for s in ["side", *stages]))
    for side, marks in rows.items():
        print("    " + f"{side:>13s} " + " ".join(
            f"{marks[s]:13.1f}" if s in marks else f"{'-':>13s}" for s in stages))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3, help="runs of each side, alternating")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--settings", nargs="+", choices=["equal", "none"],
                        default=["equal", "none"])
    parser.add_argument("--sides", nargs="+", default=["seed", "captionflow"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--profile-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true",
                        help="also one timed-stage run of each side per settings")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="captionflow-bench-seed-"))
    model = build_tiny_model(work / "models")  # folder qwen2.5-vl-tiny: DataFlow's IO lookup
    clips = make_clips(args.clips, 10.0, 25)
    print(f"{args.clips} clips of 10 s 640x360, {args.max_tokens} tokens, the seed's serving "
          f"arguments; {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; seed engine "
          f"arguments {SEED_ENGINE_ARGS}", flush=True)
    for settings in args.settings:
        if args.profile_only:
            profile(work, clips, model, args, settings)
            continue
        med = run_pairs(args, work, clips, model, settings)
        s, c = med["seed"], med["captionflow"]
        print(f"{settings} settings, medians of {args.runs}: wall {c['wall_s']:.1f} vs "
              f"{s['wall_s']:.1f} s = {c['wall_s'] / s['wall_s']:.2f}x; largest process "
              f"{c['largest'] / 2**20:.0f} vs {s['largest'] / 2**20:.0f} MiB = "
              f"{c['largest'] / s['largest']:.2f}x; tree {c['sum'] / 2**20:.0f} vs "
              f"{s['sum'] / 2**20:.0f} MiB = {c['sum'] / s['sum']:.2f}x "
              f"(captionflow vs seed); load {os.getloadavg()[0]:.1f}", flush=True)
        if args.profile:
            profile(work, clips, model, args, settings)


if __name__ == "__main__":
    main()
