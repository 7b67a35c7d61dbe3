"""Throughput of the vLLM backend against vLLM's offline ``LLM.generate`` on the same 32
requests, in the same run, on the tiny model (CPU engine) or a real one.

    python bench/bench_serving.py [--model DIR] [--requests 32] [--frames 8] [--max-tokens 32]

Prints both rates and their ratio (goal >= 0.9). Both engines get the same settings; they
run one after the other so they never share the machine.
"""

from __future__ import annotations

import argparse
import asyncio
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
from tests.support.model_fixtures import synthetic_clip  # noqa: E402


def _requests(n: int, frames: int) -> list[CaptionRequest]:
    return [CaptionRequest(f"bench-{i}", synthetic_clip(i, frames=frames, height=84, width=112),
                           "") for i in range(n)]


async def _backend_rate(settings, requests) -> tuple[float, int]:
    backend = VllmBackend(settings)
    await backend.start()
    try:
        await backend.caption(requests[0])  # warm-up, not timed
        started = time.perf_counter()
        results = await asyncio.gather(*(backend.caption(r) for r in requests))
        elapsed = time.perf_counter() - started
    finally:
        await backend.close()
    return len(requests) / elapsed, sum(r.completion_tokens for r in results)


def _offline_rate(settings, requests, prompt_text: str) -> tuple[float, int]:
    from dataclasses import asdict

    from vllm import LLM, SamplingParams

    args = asdict(engine_args(settings))
    llm = LLM(**{k: v for k, v in args.items() if k in _LLM_KEYS})
    params = SamplingParams(temperature=settings.temperature, max_tokens=settings.max_tokens)
    inputs = [{"prompt": prompt_text,
               "multi_modal_data": {"video": (r.clip.frames, video_metadata(r.clip))}}
              for r in requests]
    try:
        llm.generate(inputs[:1], params, use_tqdm=False)
        started = time.perf_counter()
        outputs = llm.generate(inputs, params, use_tqdm=False)
        elapsed = time.perf_counter() - started
    finally:
        llm.llm_engine.engine_core.shutdown()
    return len(requests) / elapsed, sum(len(o.outputs[0].token_ids) for o in outputs)


_LLM_KEYS = {"model", "dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
             "enforce_eager", "kv_cache_memory_bytes", "limit_mm_per_prompt",
             "tensor_parallel_size", "gpu_memory_utilization", "mm_processor_kwargs",
             "trust_remote_code", "download_dir"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="model folder (default: build the tiny model)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="captionflow-bench-"))
    prepare_vllm_environment(work)
    model = args.model or build_tiny_model(work / "models")
    # ignore_eos would differ between the two APIs; greedy with a fixed budget is comparable.
    settings = tiny_cpu_settings(model, temperature=0.0, max_tokens=args.max_tokens,
                                 work_dir=work)
    requests = _requests(args.requests, args.frames)
    backend_rps, backend_tokens = asyncio.run(_backend_rate(settings, requests))
    from transformers import AutoTokenizer

    from captionflow.serving.prompt import build_messages, render_prompt
    prompt_text = render_prompt(AutoTokenizer.from_pretrained(model), build_messages(""))
    offline_rps, offline_tokens = _offline_rate(settings, requests, prompt_text)
    print(f"requests={args.requests} frames={args.frames} max_tokens={args.max_tokens}")
    print(f"backend (AsyncLLM): {backend_rps:.2f} req/s, {backend_tokens} tokens")
    print(f"offline LLM.generate: {offline_rps:.2f} req/s, {offline_tokens} tokens")
    print(f"ratio backend/offline: {backend_rps / offline_rps:.3f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
