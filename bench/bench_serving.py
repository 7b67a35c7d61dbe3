"""Throughput of the vLLM backend against vLLM's offline ``LLM.generate`` on the same 32
requests, in the same run, on the tiny model (CPU engine) or a real one.

    python bench/bench_serving.py [--model DIR] [--requests 32] [--frames 8] [--max-tokens 32]

Prints both rates and their ratio (goal >= 0.9). Both engines get the same engine settings
(stats logging on for both: the backend keeps vLLM's Prometheus metrics) and run one after
the other so they never share the machine. Each side gets the same untimed warm-up request,
then ``--rounds`` timed rounds of the same ``--requests`` clips, every round with clips of
its own (so vLLM's multimodal processor cache never serves a repeat); for the backend all of
a round's requests are submitted at once, for the offline engine as one ``generate`` call,
preprocessing included on both sides. ``--pairs`` runs of both sides alternate their order
(backend first, then offline first, ...) so that a change of the machine's load during the
run does not favour one side; the medians over all rounds are compared. The load average is
printed: on a shared 2-core box other processes move single rounds a lot.
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

# The synthetic clips come from the test support code beside this folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captionflow.serving import (
    CaptionRequest,
    VllmBackend,
    build_tiny_model,
    prepare_vllm_environment,
    tiny_cpu_settings,
)
from captionflow.serving.engine_setup import engine_args
from captionflow.serving.prompt import video_metadata
from tests.support.model_fixtures import synthetic_clip


def _requests(n: int, frames: int, first_seed: int) -> list[CaptionRequest]:
    return [CaptionRequest(f"bench-{first_seed + i}",
                           synthetic_clip(first_seed + i, frames=frames, height=84, width=112),
                           "") for i in range(n)]


def _rounds(args) -> tuple[CaptionRequest, list[list[CaptionRequest]]]:
    """One warm-up request and ``rounds`` lists of distinct clips (identical for both sides)."""
    warm = _requests(1, args.frames, 10_000_000)[0]
    return warm, [_requests(args.requests, args.frames, r * args.requests)
                  for r in range(args.rounds)]


async def _backend_rates(settings, warm, rounds) -> tuple[list[float], int]:
    backend = VllmBackend(settings)
    await backend.start()
    rates, tokens = [], 0
    try:
        await backend.caption(warm)  # warm-up, not timed
        for requests in rounds:
            started = time.perf_counter()
            results = await asyncio.gather(*(backend.caption(r) for r in requests))
            rates.append(len(requests) / (time.perf_counter() - started))
            tokens += sum(r.completion_tokens for r in results)
    finally:
        await backend.close()
    return rates, tokens


def _offline_rates(settings, warm, rounds, prompt_text: str) -> tuple[list[float], int]:
    from dataclasses import asdict

    from vllm import LLM, SamplingParams

    args = asdict(engine_args(settings))
    llm = LLM(**{k: v for k, v in args.items() if k in _LLM_KEYS})
    params = SamplingParams(temperature=settings.temperature, max_tokens=settings.max_tokens)

    def inputs(requests):
        return [{"prompt": prompt_text,
                 "multi_modal_data": {"video": (r.clip.frames, video_metadata(r.clip))}}
                for r in requests]

    rates, tokens = [], 0
    try:
        llm.generate(inputs([warm]), params, use_tqdm=False)  # warm-up, not timed
        for requests in rounds:
            started = time.perf_counter()  # the offline side's input building is timed too
            outputs = llm.generate(inputs(requests), params, use_tqdm=False)
            rates.append(len(requests) / (time.perf_counter() - started))
            tokens += sum(len(o.outputs[0].token_ids) for o in outputs)
    finally:
        llm.llm_engine.engine_core.shutdown()
    return rates, tokens


# The engine settings LLM() takes, the same values the backend's AsyncEngineArgs get
# (disable_log_stats included: LLM() would otherwise switch stats off).
_LLM_KEYS = {"model", "dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
             "enforce_eager", "kv_cache_memory_bytes", "limit_mm_per_prompt",
             "tensor_parallel_size", "gpu_memory_utilization", "mm_processor_kwargs",
             "trust_remote_code", "download_dir", "disable_log_stats"}


def _fmt(rates: list[float]) -> str:
    return ", ".join(f"{r:.2f}" for r in rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="model folder (default: build the tiny model)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per side and run")
    parser.add_argument("--pairs", type=int, default=2,
                        help="runs of both sides, in alternating order")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="captionflow-bench-"))
    prepare_vllm_environment(work)
    model = args.model or build_tiny_model(work / "models")
    # ignore_eos would differ between the two APIs; greedy with a fixed budget is comparable.
    settings = tiny_cpu_settings(model, temperature=0.0, max_tokens=args.max_tokens,
                                 work_dir=work)
    warm, rounds = _rounds(args)
    from transformers import AutoTokenizer

    from captionflow.serving.prompt import build_messages, render_prompt
    prompt_text = render_prompt(AutoTokenizer.from_pretrained(model), build_messages(""))
    load_before = os.getloadavg()[0]
    backend_rates: list[float] = []
    offline_rates: list[float] = []
    backend_tokens = offline_tokens = 0
    for pair in range(args.pairs):
        sides = ["backend", "offline"] if pair % 2 == 0 else ["offline", "backend"]
        for side in sides:
            if side == "backend":
                rates, tokens = asyncio.run(_backend_rates(settings, warm, rounds))
                backend_rates += rates
                backend_tokens += tokens
            else:
                rates, tokens = _offline_rates(settings, warm, rounds, prompt_text)
                offline_rates += rates
                offline_tokens += tokens
            print(f"pair {pair} {side}: {_fmt(rates)} req/s", flush=True)
    load_after = os.getloadavg()[0]
    backend_rps = statistics.median(backend_rates)
    offline_rps = statistics.median(offline_rates)
    print(f"requests={args.requests} frames={args.frames} max_tokens={args.max_tokens} "
          f"rounds={args.rounds} pairs={args.pairs} load(1 min) {load_before:.2f} -> "
          f"{load_after:.2f}")
    print(f"backend (AsyncLLM): median {backend_rps:.2f} req/s, {backend_tokens} tokens")
    print(f"offline LLM.generate: median {offline_rps:.2f} req/s, {offline_tokens} tokens")
    print(f"ratio backend/offline: {backend_rps / offline_rps:.3f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
