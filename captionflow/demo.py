"""`captionflow demo`: the whole service on one machine, no GPU and no network needed.

Embedded broker -> sample videos published -> one worker (vLLM engine) -> captions printed.
Without ``--model`` it builds a tiny random-weight Qwen2.5-VL locally, so the captions are
gibberish by design: the point is the plumbing. ``--model`` points it at a real checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from pathlib import Path

from rich.console import Console

from captionflow.broker import EmbeddedBroker
from captionflow.config import (
    MetricsSettings,
    ServingSettings,
    Settings,
    TopicSettings,
    VideoSettings,
    WorkerSettings,
)
from captionflow.consumer.subscriber import subscribe
from captionflow.metrics import Metrics
from captionflow.producer import Publisher
from captionflow.samples import make_sample_videos
from captionflow.schemas import decode_caption_event, decode_dead_letter_event
from captionflow.schemas.events import VideoEvent

log = logging.getLogger(__name__)


def demo_serving(work_dir: Path, model: str | None, max_tokens: int) -> tuple[ServingSettings, bool]:
    """Serving settings for the demo, and whether the model is the random tiny one."""
    from captionflow.serving.engine_setup import prepare_vllm_environment, tiny_cpu_settings
    from captionflow.serving.tiny_model import TINY_MODEL_DIRNAME, build_tiny_model

    # zmq's IPC socket paths are limited to 107 bytes; a deep work dir would exceed them.
    os.environ.setdefault("VLLM_RPC_BASE_PATH", tempfile.mkdtemp(prefix="cf-rpc-"))
    # The demo's files go in its work dir, but vLLM's cache stays the user's (a warm one
    # saves each start ~11 s: serving/engine_setup.prepare_vllm_environment).
    (work_dir / "vllm" / "tmp").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TMPDIR", str(work_dir / "vllm" / "tmp"))
    prepare_vllm_environment()
    tiny = model is None
    if tiny:
        existing = work_dir / "models" / TINY_MODEL_DIRNAME
        model = str(existing if (existing / "config.json").exists()
                    else build_tiny_model(work_dir / "models"))
    return tiny_cpu_settings(model, temperature=0.0 if tiny else 0.7,
                             max_tokens=max_tokens), tiny


async def run_demo(*, work_dir: Path, model: str | None, videos: int, max_tokens: int,
                   timeout_s: float, console: Console) -> int:
    from captionflow.consumer.service import Worker

    started = time.monotonic()
    work_dir.mkdir(parents=True, exist_ok=True)
    samples = make_sample_videos(work_dir / "videos", videos)
    console.print(f"[bold]1/4[/bold] made {len(samples)} sample videos in {samples[0].parent}")
    serving, tiny = demo_serving(work_dir, model, max_tokens)
    console.print(f"[bold]2/4[/bold] model: {serving.model}")
    if tiny:
        console.print("      [yellow]this is a tiny RANDOM-WEIGHT test model built on this machine:"
                      " its captions are gibberish.[/yellow] For real captions run "
                      "`captionflow demo --model Qwen/Qwen2.5-VL-7B-Instruct` (or a local "
                      "checkpoint path) on a machine that has the weights.")
    topics = TopicSettings(input="demo.videos", output="demo.captions",
                           dead_letter="demo.dead-letter", partitions=2)
    with EmbeddedBroker(topics=(topics.input, topics.output, topics.dead_letter),
                        partitions=topics.partitions) as broker:
        console.print(f"[bold]3/4[/bold] embedded Kafka broker at {broker.bootstrap_servers}; "
                      "starting a worker (the engine takes a minute to load on a CPU)")
        settings = Settings(
            kafka=broker.kafka_settings(), topics=topics, serving=serving,
            video=VideoSettings(allowed_roots=(samples[0].parent,), max_frames=8,
                                min_pixels=28 * 28 * 4,
                                max_pixels=224 * 168),
            # Random weights truncate every caption, so the quality gate would only ask
            # again for nothing; a real checkpoint keeps the service's gate.
            worker=WorkerSettings(group_id="captionflow-demo", session_timeout_ms=2000,
                                  heartbeat_interval_ms=200, commit_interval_ms=200,
                                  **({"quality_gate_retries": 0} if tiny else {})),
            metrics=MetricsSettings(host="127.0.0.1", port=0))
        metrics = Metrics.fresh()
        worker = Worker(settings, metrics=metrics)
        worker_task = asyncio.create_task(worker.run())
        # The engine's start-up blocks the event loop for a while; connect the publisher after.
        polling = asyncio.create_task(worker.started.wait())
        await asyncio.wait({polling, worker_task}, return_when=asyncio.FIRST_COMPLETED)
        if worker_task.done():
            polling.cancel()
            return await worker_task or 1
        async with Publisher(settings.kafka, topic=topics.input) as pub:
            report = await pub.publish_inputs([str(p) for p in samples], id_from="path")
            # One reference that does not exist, to show a dead-letter event.
            await pub.send(VideoEvent(id="demo-missing", video=[str(samples[0].parent /
                                                                     "no-such-video.mp4")]))
        expected = len(report.sent) + 1
        outputs: list[bytes] = []
        reader = asyncio.create_task(subscribe(
            settings.kafka, [topics.output, topics.dead_letter],
            sink=lambda r: outputs.append(r.value), count=expected, timeout_s=timeout_s))
        await asyncio.wait({reader, worker_task}, return_when=asyncio.FIRST_COMPLETED)
        worker.stop()
        code = await worker_task
        if not reader.done():
            reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    console.print(f"[bold]4/4[/bold] {len(outputs)} of {expected} results:\n")
    _print_results(outputs, console)
    _print_metrics(metrics, console, time.monotonic() - started)
    if code != 0 or len(outputs) < expected:
        console.print(f"[red]demo incomplete (worker exit code {code})[/red]")
        return 1
    return 0


def _print_results(outputs: list[bytes], console: Console) -> None:
    for raw in outputs:
        if b'"caption"' in raw:
            ev = decode_caption_event(raw)
            console.print(f"[bold green]{Path(ev.video[0]).name}[/bold green]  "
                          f"({ev.video_info.frames_sampled if ev.video_info else '?'} frames, "
                          f"{ev.usage.completion_tokens} tokens, {ev.timings.total_ms:.0f} ms)")
            console.print(f"  caption: {ev.caption!r}", markup=False)
        else:
            dl = decode_dead_letter_event(raw)
            console.print(f"[bold red]dead letter[/bold red] id={dl.id} "
                          f"code={dl.error.code.value}")
            console.print(f"  {dl.error.message}", markup=False)
    console.print()


def _print_metrics(metrics: Metrics, console: Console, elapsed_s: float) -> None:
    def value(name: str, **labels: str) -> float:
        v = metrics.registry.get_sample_value(name, labels or None)
        return v or 0.0

    e2e_n = value("captionflow_stage_duration_seconds_count", stage="end_to_end")
    e2e_sum = value("captionflow_stage_duration_seconds_sum", stage="end_to_end")
    dead = sum(s.value for m in metrics.registry.collect()
               if m.name == "captionflow_events_dead_lettered" for s in m.samples
               if s.name.endswith("_total"))
    console.print(
        f"metrics: consumed {value('captionflow_events_consumed_total', topic='demo.videos'):.0f}"
        f", captioned {value('captionflow_events_captioned_total'):.0f}, dead-lettered "
        f"{dead:.0f}, frames {value('captionflow_frames_decoded_total'):.0f}, tokens in/out "
        f"{value('captionflow_tokens_total', kind='prompt'):.0f}/"
        f"{value('captionflow_tokens_total', kind='completion'):.0f}, mean end-to-end "
        f"{(e2e_sum / e2e_n if e2e_n else 0):.2f} s; demo took {elapsed_s:.0f} s")
