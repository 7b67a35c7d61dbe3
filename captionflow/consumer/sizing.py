"""How much work a worker keeps in flight, sized from its engine, so the engine never runs dry.

- **In the engine** (``worker.max_in_engine``): the engine's running capacity (vLLM's
  ``max_num_seqs``, or ``serving.openai_max_concurrency`` for a remote server) plus one
  micro-batch (``worker.max_batch_size``) waiting inside it. When a request finishes, the
  scheduler takes the next one from its own queue at once, while the micro-batcher sends a
  replacement, so a slot never waits for the worker's round trip. An engine that cannot
  say (the transformers backend) gets one batch running and one waiting.
- **In flight** (``worker.max_in_flight``, events consumed and not yet published): what
  the engine holds plus one more batch's worth of events being fetched and decoded (at least
  one per decoder process), so the next requests are decoded before slots open. Partitions
  resume (``worker.resume_in_flight``) once in-flight falls to what the engine holds: the
  engine's own queue covers the decode time of the events fetched then.

Settings given explicitly win; a ``max_in_flight`` below what keeps the engine full is
logged, since the engine then idles behind the worker.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

from captionflow.config import Settings, VideoSettings, WorkerSettings
from captionflow.metrics import Metrics
from captionflow.serving.base import CaptionBackend, EngineCapacity

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Sizing:
    worker: WorkerSettings  # with max_in_engine, max_in_flight and resume_in_flight set
    running: int  # requests the engine runs at once
    source: str


def size_worker(worker: WorkerSettings, video: VideoSettings,
                capacity: EngineCapacity | None) -> Sizing:
    batch = worker.max_batch_size
    given = worker.model_fields_set
    if capacity is None:
        running, source = batch, "unknown engine capacity: one micro-batch"
    else:
        running, source = max(1, capacity.running), capacity.source
    in_engine = worker.max_in_engine if worker.max_in_engine is not None else running + batch
    wanted = in_engine + max(batch, video.decode_workers)
    update: dict[str, int] = {"max_in_engine": in_engine}
    if "max_in_flight" not in given:
        update["max_in_flight"] = wanted if "resume_in_flight" not in given \
            else max(wanted, worker.resume_in_flight + 1)
        if "resume_in_flight" not in given:
            update["resume_in_flight"] = min(in_engine, wanted - 1)
    elif "resume_in_flight" not in given:
        update["resume_in_flight"] = min(in_engine, worker.max_in_flight - 1)
    if "max_in_flight" in given and worker.max_in_flight < wanted:
        log.warning("worker.max_in_flight=%d is below the %d events that keep the engine "
                    "full (%d in the engine, %s, plus a batch being decoded): the engine "
                    "will idle behind the worker", worker.max_in_flight, wanted, in_engine,
                    source)
    sized = worker.model_copy(update=update)
    return Sizing(worker=WorkerSettings.model_validate(sized.model_dump()), running=running,
                  source=source)


def export_engine_load(metrics: Metrics, sizing: Sizing, backend: CaptionBackend) -> None:
    """The sizing as gauges, and the engine's running and waiting requests read at scrape
    time, so that a starved engine shows next to the worker's in-flight count."""
    metrics.engine_request_limit.labels("running").set(sizing.running)
    metrics.engine_request_limit.labels("in_engine").set(sizing.worker.max_in_engine or 0)

    def state(name: str) -> float:
        load = backend.load()
        return float(getattr(load, name)) if load is not None else 0.0

    for name in ("running", "waiting"):
        metrics.engine_requests.labels(name).set_function(partial(state, name))


def size_from_engine(settings: Settings, backend: CaptionBackend, metrics: Metrics) -> Settings:
    """``settings`` with the worker sized from the started engine, its load exported beside
    the engine's own running and waiting counts."""
    sizing = size_worker(settings.worker, settings.video, backend.capacity())
    w = sizing.worker
    log.info("engine sizing (%s): up to %d requests in the engine, %d events in flight, "
             "resume below %d", sizing.source, w.max_in_engine, w.max_in_flight,
             w.resume_in_flight)
    export_engine_load(metrics, sizing, backend)
    return settings.model_copy(update={"worker": w})
