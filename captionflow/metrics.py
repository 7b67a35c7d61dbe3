"""Every metric a worker exports (catalogue: docs/metrics.md). One object, injected registry.

Names follow Prometheus conventions: ``captionflow_`` prefix, ``_total`` counters,
``_seconds`` durations. vLLM registers its own ``vllm:*`` metrics in the default registry;
the worker's /metrics endpoint serves both.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from captionflow.errors import ErrorCode
from captionflow.quality import REGENERATE, STATUSES

STAGES = ("fetch", "decode", "queue", "inference", "publish", "end_to_end")
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                     120.0, 300.0, 600.0)
BYTES_BUCKETS = tuple(float(1 << n) for n in range(16, 36, 2))  # 64 KiB .. 16 GiB
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        self.events_consumed = Counter(
            "captionflow_events_consumed_total", "Records read from the input topic.",
            ["topic"], registry=r)
        self.events_captioned = Counter(
            "captionflow_events_captioned_total", "Caption events published.", registry=r)
        self.events_dead_lettered = Counter(
            "captionflow_events_dead_lettered_total",
            "Dead-letter events published, by error code.", ["code"], registry=r)
        self.events_retried = Counter(
            "captionflow_events_retried_total", "Retries of retriable failures, by error code.",
            ["code"], registry=r)
        self.stage_seconds = Histogram(
            "captionflow_stage_duration_seconds",
            "Time per event in each stage (end_to_end: consumed to published).", ["stage"],
            buckets=LATENCY_BUCKETS_S, registry=r)
        self.batch_size = Histogram(
            "captionflow_batch_size_events", "Events per micro-batch sent to the engine.",
            buckets=BATCH_BUCKETS, registry=r)
        self.in_flight = Gauge(
            "captionflow_in_flight_events", "Consumed events not yet published.", registry=r)
        self.engine_requests = Gauge(
            "captionflow_engine_requests",
            "Requests inside the engine by state: running, and waiting there for a slot (the "
            "vllm backend: its scheduler's counts; openai: this worker's requests at the "
            "server, and those waiting for one of serving.openai_max_concurrency).",
            ["state"], registry=r)
        self.engine_queued_requests = Gauge(
            "captionflow_engine_queued_requests",
            "Decoded requests the micro-batcher holds because the engine holds "
            "worker.max_in_engine already.", registry=r)
        self.engine_request_limit = Gauge(
            "captionflow_engine_request_limit",
            "The sizing (docs/worker.md): requests the engine runs at once (limit=running) "
            "and the most this worker keeps inside it (limit=in_engine).", ["limit"],
            registry=r)
        self.paused_partitions = Gauge(
            "captionflow_paused_partitions",
            "Assigned partitions paused (backpressure, a dependency outage or the poison guard).",
            registry=r)
        self.assigned_partitions = Gauge(
            "captionflow_assigned_partitions", "Partitions assigned to this worker.", registry=r)
        self.consumer_lag = Gauge(
            "captionflow_consumer_lag_records",
            "Records between the committed offset and the end of the partition.",
            ["topic", "partition"], registry=r)
        self.oldest_unfinished_age = Gauge(
            "captionflow_oldest_unfinished_record_age_seconds",
            "Seconds since the oldest unfinished record of the partition was consumed (0 when "
            "none is); finished records above it wait for it to be committed.",
            ["topic", "partition"], registry=r)
        self.tokens = Counter(
            "captionflow_tokens_total", "Model tokens, by kind (prompt, completion).",
            ["kind"], registry=r)
        self.frames_decoded = Counter(
            "captionflow_frames_decoded_total", "Frames sampled and sent to the model.",
            registry=r)
        self.video_bytes_read = Histogram(
            "captionflow_video_read_bytes",
            "Bytes fetched over the network per event (object store ranges or a download); "
            "local files are not counted.", buckets=BYTES_BUCKETS, registry=r)
        self.decode_device_fallbacks = Counter(
            "captionflow_decode_device_fallbacks_total",
            "Clips that a GPU video.decode_device did not decode, so the CPU did, by reason: "
            "device_unavailable, codec_unsupported, device_out_of_memory, hw_decode_failed.", ["reason"],
            registry=r)
        self.captions = Counter(
            "captionflow_captions_total",
            "Captions generated, by status (ok, truncated, repetitive, empty, invalid_json): "
            "each window's and prompt's, and each summary, after the quality gate.",
            ["status"], registry=r)
        self.caption_regenerations = Counter(
            "captionflow_caption_regenerations_total",
            "Extra engine requests made by the quality gate, by the status that caused them.",
            ["status"], registry=r)
        self.cache_lookups = Counter(
            "captionflow_cache_lookups_total",
            "Caption cache lookups, one per window, prompt and summary, by result: hit, miss, "
            "error (the store failed or was late: captioned without it), bypass "
            "(options.cache false, or serving.cache_sampled false for a sampled request).",
            ["result"], registry=r)
        self.cache_writes = Counter(
            "captionflow_cache_writes_total", "Caption cache writes, by result (ok, error).",
            ["result"], registry=r)
        self.cache_saved_engine_seconds = Counter(
            "captionflow_cache_saved_engine_seconds_total",
            "Engine time the cache hits saved (the stored generations' inference time).",
            registry=r)
        self.cache_saved_tokens = Counter(
            "captionflow_cache_saved_tokens_total",
            "Model tokens the cache hits saved, by kind (prompt, completion).", ["kind"],
            registry=r)
        self.rebalances = Counter(
            "captionflow_rebalances_total",
            "Partition changes, by kind: assigned, revoked, lost; after a revoke, kept (some "
            "partitions came back, their work went on) and moved (some went to another member, "
            "their unfinished work was cancelled).",
            ["kind"], registry=r)
        self.commits = Counter(
            "captionflow_commits_total", "Offset commits, by result (ok, failed).", ["result"],
            registry=r)
        self.ready = Gauge(
            "captionflow_ready", "1 when /readyz is 200: every dependency answers, the poison "
            "guard has not tripped and the worker is not stopping.", registry=r)
        self.dependency_up = Gauge(
            "captionflow_dependency_up",
            "1 when a dependency answers, by dependency (broker, engine, object_store).",
            ["dependency"],
            registry=r)
        self.dependency_outages = Counter(
            "captionflow_dependency_outages_total",
            "Times a dependency was marked down (the worker paused until it answered).",
            ["dependency"], registry=r)
        self.dependency_misconfigured = Gauge(
            "captionflow_dependency_misconfigured",
            "1 while a dependency refuses this worker's own settings (credentials, API key, "
            "ACLs), by dependency: waiting will not end it, a fix will.", ["dependency"],
            registry=r)
        self.engine_stalled = Gauge(
            "captionflow_engine_stalled_seconds",
            "Seconds the engine has had requests in flight without returning a token.",
            registry=r)
        self.poison_guard_tripped = Gauge(
            "captionflow_poison_guard_tripped",
            "1 when the poison guard stopped consumption (the code is in /readyz and the log).",
            registry=r)
        self.events_held = Counter(
            "captionflow_events_held_total",
            "Records the tripped poison guard held instead of dead-lettering them, by error "
            "code: left uncommitted, they are redelivered after a restart.", ["code"],
            registry=r)
        self.outputs_reduced = Counter(
            "captionflow_outputs_reduced_total",
            "Caption events that dropped echoed fields to fit the producer's size limit.",
            registry=r)
        self.last_progress = Gauge(
            "captionflow_last_progress_timestamp_seconds",
            "Unix time the worker last made progress (a record finished, or nothing to do).", registry=r)
        self.info = Gauge(
            "captionflow_worker_info", "Constant 1, labelled with what this worker runs.",
            ["version", "backend", "model", "group"], registry=r)
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        for kind in ("prompt", "completion"):
            self.tokens.labels(kind)
            self.cache_saved_tokens.labels(kind)
        for result in ("hit", "miss", "error", "bypass"):
            self.cache_lookups.labels(result)
        for result in ("ok", "error"):
            self.cache_writes.labels(result)
        for status in STATUSES:
            self.captions.labels(status)
        for status in sorted(REGENERATE):
            self.caption_regenerations.labels(status)
        for kind in ("assigned", "revoked", "lost", "kept", "moved"):
            self.rebalances.labels(kind)
        for state in ("running", "waiting"):
            self.engine_requests.labels(state)
        for limit in ("running", "in_engine"):
            self.engine_request_limit.labels(limit)
        for result in ("ok", "failed"):
            self.commits.labels(result)
        for dependency in ("broker", "engine"):
            self.dependency_up.labels(dependency)
            self.dependency_outages.labels(dependency)
        for dependency in ("broker", "engine", "object_store"):
            self.dependency_misconfigured.labels(dependency)
        # Series exist from the start, so dashboards and rate() see 0 rather than nothing.
        for code in (ErrorCode.FETCH_TIMEOUT, ErrorCode.FETCH_FAILED,
                     ErrorCode.ENGINE_OVERLOADED, ErrorCode.ENGINE_FAILED):
            self.events_retried.labels(code.value)

    @classmethod
    def fresh(cls) -> Metrics:
        return cls(CollectorRegistry())
