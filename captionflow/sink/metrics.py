"""The sink's Prometheus metrics (``captionflow_sink_`` prefix, units in names), in a
registry of their own so that a sink exports none of the worker's series."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

WRITE_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class SinkMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = r = registry
        self.files = Counter("captionflow_sink_files_total",
                             "Files written (committed to the store), by dataset.",
                             ["dataset"], registry=r)
        self.rows = Counter("captionflow_sink_rows_total", "Rows in the files written.",
                            ["dataset"], registry=r)
        self.bytes = Counter("captionflow_sink_bytes_total", "Bytes of the files written.",
                             ["dataset"], registry=r)
        self.skipped = Counter(
            "captionflow_sink_records_skipped_total",
            "Records left out of the dataset, by reason (malformed_json: not a JSON object; "
            "schema_mismatch: a value of the wrong type for its column).", ["reason"],
            registry=r)
        self.write_seconds = Histogram(
            "captionflow_sink_file_write_duration_seconds",
            "Time to write one file to the store (encoding excluded).",
            buckets=WRITE_BUCKETS_S, registry=r)
        self.write_failures = Counter(
            "captionflow_sink_write_failures_total",
            "Failed file writes (each is retried; the rows stay buffered).", registry=r)
        self.commits = Counter("captionflow_sink_commits_total",
                               "Offset commits, by result (ok, failed).", ["result"],
                               registry=r)
        self.buffered = Gauge("captionflow_sink_buffered_records",
                              "Records consumed and not yet in a committed file.", registry=r)
        self.lag = Gauge("captionflow_sink_consumer_lag_records",
                         "Records between the sink's committed offset and the partition's end.",
                         ["topic", "partition"], registry=r)
        self.last_commit = Gauge("captionflow_sink_last_commit_timestamp_seconds",
                                 "Unix time of the last successful offset commit.", registry=r)
        self.since_commit = Gauge(
            "captionflow_sink_seconds_since_last_commit",
            "Seconds since the last successful offset commit (since start before the first).",
            registry=r)
        self.ready = Gauge("captionflow_sink_ready",
                           "1 when the broker and the store answer.", registry=r)
        self.dependency_up = Gauge("captionflow_sink_dependency_up",
                                   "1 when a dependency answers (broker, object_store).",
                                   ["dependency"], registry=r)
        self._last_commit_at = time.time()
        self.since_commit.set_function(lambda: time.time() - self._last_commit_at)
        for result in ("ok", "failed"):
            self.commits.labels(result)
        for reason in ("malformed_json", "schema_mismatch"):
            self.skipped.labels(reason)
        for dependency in ("broker", "object_store"):
            self.dependency_up.labels(dependency).set(1)

    def committed(self) -> None:
        self._last_commit_at = time.time()
        self.last_commit.set(self._last_commit_at)
        self.commits.labels("ok").inc()

    @classmethod
    def fresh(cls) -> SinkMetrics:
        return cls(CollectorRegistry())
