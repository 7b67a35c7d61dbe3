"""What the in-process vLLM engine says about itself: how many requests it runs at once
(``max_num_seqs``, from its config, with its KV cache for the log) and how many it is running
and keeping waiting now (its scheduler's own counts, through a vLLM stat logger, the
interface vLLM offers for reading them; the same figures feed ``vllm:num_requests_*``).

The KV cache does not lower the capacity: vLLM admits a request only once its KV blocks
fit, so requests beyond what the cache holds wait inside the engine, which is where the
worker's reserve is meant to wait anyway. Capping by the largest request the sampling
settings allow would starve the engine on the typical, much shorter clip.
"""

from __future__ import annotations

import logging
from typing import Any

from captionflow.serving.base import EngineCapacity, EngineLoad

log = logging.getLogger(__name__)


class SchedulerCounts:
    """The scheduler's running and waiting requests as of its last step."""

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0

    def load(self) -> EngineLoad:
        return EngineLoad(running=self.running, waiting=self.waiting)

    def stat_logger(self) -> type:
        """A vLLM per-engine stat logger class that records into this object."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        counts = self

        class CaptionflowSchedulerCounts(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                self.engine_index = engine_index

            def record(self, scheduler_stats: Any, iteration_stats: Any,
                       mm_cache_stats: Any = None, engine_idx: int = 0) -> None:
                if scheduler_stats is None:
                    return
                counts.running = int(scheduler_stats.num_running_reqs)
                counts.waiting = int(scheduler_stats.num_waiting_reqs) + int(
                    getattr(scheduler_stats, "num_skipped_waiting_reqs", 0))

            def log_engine_initialized(self) -> None:
                pass

        return CaptionflowSchedulerCounts


def engine_capacity(engine: Any, largest_request_tokens: int) -> EngineCapacity:
    """The started engine's ``max_num_seqs``; its KV cache, counted in the largest requests
    the sampling settings allow, goes into the description for the log."""
    config = engine.vllm_config
    seqs = int(config.scheduler_config.max_num_seqs)
    kv_tokens = getattr(config.cache_config, "kv_cache_size_tokens", None)
    source = f"vLLM max_num_seqs={seqs}"
    if kv_tokens:
        fits = int(kv_tokens) // max(1, largest_request_tokens)
        source += (f"; its KV cache holds {int(kv_tokens):,} tokens, {fits} requests of the "
                   f"largest ({largest_request_tokens:,} tokens) the sampling settings allow")
        if fits < seqs:
            log.info("the KV cache holds fewer of the largest requests (%d) than max_num_seqs "
                     "(%d): such requests wait inside the engine until blocks free", fits,
                     seqs)
    return EngineCapacity(seqs, source)
