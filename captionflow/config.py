"""Settings: one frozen object, built once at the entrypoint and passed down as values.

Precedence, highest first: explicit overrides (CLI flags) > ``CAPTIONFLOW_*`` environment
variables (nested with ``__``, e.g. ``CAPTIONFLOW_SERVING__MAX_TOKENS=512``) > a config file
(TOML or JSON, from ``--config`` or ``CAPTIONFLOW_CONFIG``) > defaults.
"""

from __future__ import annotations

import contextvars
import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from captionflow.errors import ConfigError

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_PROMPT = "Please describe the video in detail."
DEFAULT_SUMMARY_PROMPT = (
    "Below are captions of consecutive parts of one video, each with its time span in "
    "seconds. Write one caption of the whole video: what happens, in order. Do not mention "
    "the parts or their times unless the order needs it.")
ENV_PREFIX = "CAPTIONFLOW_"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(_Section):
    """How to reach the cluster. SASL/SSL values are handed to aiokafka unchanged."""

    bootstrap_servers: str = Field(
        "127.0.0.1:9092", description="Comma-separated host:port list of the Kafka brokers.")
    client_id: str = Field(
        "captionflow", description="Prefix of every Kafka client id (a suffix names the role).")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="How to talk to the brokers: plain, TLS, SASL, or SASL over TLS.")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512",
                            "OAUTHBEARER"] | None = Field(
        None, description="SASL mechanism; needed with SASL_PLAINTEXT or SASL_SSL.")
    sasl_username: str | None = Field(
        None, description="SASL user (PLAIN and SCRAM mechanisms).")
    sasl_password: SecretStr | None = Field(
        None, description="SASL password (PLAIN and SCRAM mechanisms); never logged.")
    ssl_cafile: Path | None = Field(
        None, description="CA bundle that signed the brokers' certificates.")
    ssl_certfile: Path | None = Field(
        None, description="Client certificate for mutual TLS (with ssl_keyfile).")
    ssl_keyfile: Path | None = Field(
        None, description="Client key for mutual TLS (with ssl_certfile).")
    # auto: idempotent where the cluster can give producer ids (real Kafka); where it cannot
    # (the embedded Tansu broker, docs/broker.md), one warning and a plain producer.
    # true: required, start-up fails without it. false: off.
    enable_idempotence: bool | Literal["auto"] = "auto"
    acks: Literal["all", "1", "0"] = Field(
        "all", description="Broker acknowledgements a produced record waits for.")
    request_timeout_ms: int = Field(30_000, gt=0,
        description="Deadline of one Kafka request.")
    # aiokafka's client-side limit on one produced request; caption events stay far below.
    max_request_size_bytes: int = Field(1_048_576, gt=0)
    # Input records above this size go to the dead-letter topic as payload_too_large.
    max_event_bytes: int = Field(1_048_576, gt=0)

    @field_validator("enable_idempotence", mode="before")
    @classmethod
    def _tri_state(cls, value: Any) -> bool | str:
        words = {"auto": "auto", "true": True, "1": True, "yes": True, "on": True,
                 "false": False, "0": False, "no": False, "off": False}
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in words:
            return words[value.strip().lower()]
        raise ValueError(f"{value!r} is not auto, true or false")

    @model_validator(mode="after")
    def _check_security(self) -> KafkaSettings:
        sasl = self.security_protocol.startswith("SASL")
        if sasl and self.sasl_mechanism is None:
            raise ValueError(
                f"security_protocol={self.security_protocol} needs sasl_mechanism "
                "(set CAPTIONFLOW_KAFKA__SASL_MECHANISM, e.g. SCRAM-SHA-512)")
        if not sasl and self.sasl_mechanism is not None:
            raise ValueError(
                f"sasl_mechanism={self.sasl_mechanism} is ignored with security_protocol="
                f"{self.security_protocol}; use SASL_SSL or SASL_PLAINTEXT, or unset the mechanism")
        if sasl and self.sasl_mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512") and (
                not self.sasl_username or self.sasl_password is None):
            raise ValueError(
                f"sasl_mechanism={self.sasl_mechanism} needs sasl_username and sasl_password")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together: set both or neither")
        if not self.security_protocol.endswith("SSL") and (self.ssl_cafile or self.ssl_certfile):
            raise ValueError(
                f"SSL files are set but security_protocol={self.security_protocol}; "
                "use SSL or SASL_SSL")
        return self


class TopicSettings(_Section):
    input: str = Field(
        "captionflow.videos", description="Topic the workers consume video events from.")
    output: str = Field(
        "captionflow.captions", description="Topic caption events are published to.")
    dead_letter: str = Field(
        "captionflow.dead-letter", description="Topic dead-letter events are published to.")
    # Used when captionflow creates the topics (embedded broker, `captionflow topics create`).
    partitions: int = Field(4, ge=1)
    replication_factor: int = Field(1, ge=1,
        description="Replication factor when captionflow creates the topics.")

    @model_validator(mode="after")
    def _distinct(self) -> TopicSettings:
        if len({self.input, self.output, self.dead_letter}) != 3:
            raise ValueError("input, output and dead_letter topics must be three different topics")
        return self


class VideoSettings(_Section):
    """Where videos may come from and how frames are sampled (qwen-vl-utils semantics)."""

    # Local paths must resolve under one of these roots. Empty means the current directory,
    # unless any_local_path is on.
    allowed_roots: tuple[Path, ...] = ()
    # With allowed_roots empty: any local file the OS user can read, relative paths from the
    # current directory (DataFlow's rule). Batch mode and the Python API turn it on, as their
    # user names their own files; the worker keeps it off, its producers are not trusted.
    any_local_path: bool = False
    # "file", "http", "https", "s3", or a scheme registered with
    # captionflow.video.register_fetcher.
    allowed_schemes: tuple[str, ...] = ("file", "http", "https")
    # Loopback/private/link-local/metadata addresses are refused unless inside one of these
    # CIDRs (e.g. "10.0.0.0/8" for an in-cluster media server).
    fetch_allowed_networks: tuple[str, ...] = ()
    max_video_bytes: int = Field(2 * 1024**3, gt=0,
        description="Largest video accepted (file size or download); above: video_too_large.")
    fetch_connect_timeout_s: float = Field(5.0, gt=0,
        description="Connect timeout of each http(s) hop.")
    fetch_read_timeout_s: float = Field(30.0, gt=0,
        description="Longest wait for the next bytes of an http(s) response.")
    # Whole download, so a server trickling bytes cannot hold a worker forever.
    fetch_total_timeout_s: float = Field(600.0, gt=0)
    fetch_max_redirects: int = Field(5, ge=0,
        description="Most http(s) redirects followed, each checked again.")
    # Downloads go here (deleted after decoding); None = the system temp directory.
    download_dir: Path | None = None
    # s3:// references (docs/storage.md; add "s3" to allowed_schemes). None leaves a value
    # to the AWS chain: AWS_ENDPOINT_URL, AWS_REGION, AWS_PROFILE, config files, roles.
    s3_endpoint_url: str | None = None
    s3_region: str | None = Field(
        None, description="Region of the object store (unset: the AWS chain's).")
    s3_profile: str | None = Field(
        None, description="AWS profile to take credentials from (unset: the default chain).")
    s3_addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto", description="Bucket in the path or in the host name (S3-compatible stores: path).")
    # Attempts per S3 request (botocore's standard retries: throttling, 5xx, resets).
    s3_max_attempts: int = Field(3, ge=1)
    # Objects up to this size are downloaded in one GET; larger ones are decoded straight
    # from the store in ranged GETs, read-ahead growing from s3_min_read_bytes to
    # s3_max_read_bytes while reads are sequential, s3_cache_bytes kept per video.
    s3_whole_object_max_bytes: int = Field(8 * 1024**2, ge=0)
    s3_min_read_bytes: int = Field(128 * 1024, gt=0)
    s3_max_read_bytes: int = Field(8 * 1024**2, gt=0)
    s3_cache_bytes: int = Field(32 * 1024**2, gt=0)
    max_duration_s: float = Field(3 * 3600.0, gt=0,
        description="Longest video accepted; above: video_too_long.")
    # Sampling defaults; events may override them within the limits below.
    fps: float = Field(2.0, gt=0)
    min_frames: int = Field(4, ge=1,
        description="Fewest frames sampled from a video.")
    max_frames: int = Field(768, ge=2,
        description="Most frames sampled from a video (or window).")
    min_pixels: int = Field(128 * 28 * 28, gt=0,
        description="Fewest pixels a sampled frame is resized to.")
    max_pixels: int = Field(768 * 28 * 28, gt=0,
        description="Most pixels a sampled frame is resized to.")
    total_pixels: int = Field(24576 * 28 * 28, gt=0,
        description="Pixel budget of all frames of one clip; frames shrink to fit it.")
    # Long videos: split into windows of this many seconds (0 = one request per video).
    # A last piece shorter than window_min_remainder_s is merged into the window before it.
    window_s: float = Field(0.0, ge=0)
    window_overlap_s: float = Field(0.0, ge=0,
        description="Seconds each window overlaps the one before it (video.window_s).")
    window_min_remainder_s: float = Field(0.0, ge=0)
    # Codec threads per decode; 0 = one per core, at most 8 (each holds a frame in flight).
    decode_threads: int = Field(0, ge=0)
    # Decoder child processes (forkserver): concurrent probes/decodes across all events.
    decode_workers: int = Field(2, ge=1)
    # Address space (RLIMIT_AS) of each decoder process; over it -> decode_out_of_memory.
    # 0 = no limit. Covers the interpreter, PyAV's libraries, codec threads and the frames.
    # With a GPU decode_device it bounds the data segment (RLIMIT_DATA) instead: the CUDA
    # driver reserves far more address space than it ever touches. That leaves out the
    # shared memory the output frames are written to (bounded by the sampling budget).
    decode_memory_limit_bytes: int = Field(4 * 1024**3, ge=0)
    # Where the codec runs: "cpu" (FFmpeg's software decoders), or "cuda" / "cuda:N" (NVDEC
    # through FFmpeg's CUDA hwaccel in PyAV's own wheel; frames come back to host memory
    # and are scaled on the CPU as before). Same sampling either way (docs/video.md).
    decode_device: str = Field("cpu", pattern=r"^(cpu|cuda(:[0-9]+)?)$")
    # One probe or window decode past this -> its process is killed, decode_timeout.
    decode_timeout_s: float = Field(600.0, gt=0)
    # Budgets checked from the container/stream headers before demuxing and again while
    # probing (headers can lie), all before any full-resolution decode.
    max_source_pixels: int = Field(7680 * 4320, gt=0)  # source width * height
    max_source_frames: int = Field(1_000_000, gt=0,
        description="Most frames a source may declare or the probe count: video_too_many_frames.")
    max_probe_packets: int = Field(2_000_000, gt=0,
        description="Most packets the probe reads; above: video_too_many_frames.")
    max_windows: int = Field(512, ge=1)  # windows per event (video.window_s)
    # Windows of one event decoded and captioned at a time: an event's frame memory is this
    # many windows' frames, whatever the video's length.
    windows_in_flight: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _bounds(self) -> VideoSettings:
        if self.min_frames > self.max_frames:
            raise ValueError("video.min_frames must not exceed video.max_frames")
        if self.min_pixels > self.max_pixels:
            raise ValueError("video.min_pixels must not exceed video.max_pixels")
        if self.window_s and self.window_overlap_s >= self.window_s:
            raise ValueError("video.window_overlap_s must be smaller than video.window_s")
        if self.window_s and self.window_min_remainder_s > self.window_s:
            raise ValueError("video.window_min_remainder_s must not exceed video.window_s")
        if self.window_s and self.window_s + self.window_min_remainder_s > self.max_duration_s:
            # With windows, max_duration_s bounds each window (the last may take in a
            # remainder up to window_min_remainder_s); the video may be as long as
            # max_windows windows cover.
            raise ValueError(
                f"video.window_s ({self.window_s:g}) plus video.window_min_remainder_s "
                f"({self.window_min_remainder_s:g}) must not exceed video.max_duration_s "
                f"({self.max_duration_s:g}), the longest window: lower window_s or raise "
                "max_duration_s")
        for cidr in self.fetch_allowed_networks:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as e:
                raise ValueError(
                    f"video.fetch_allowed_networks entry {cidr!r} is not a CIDR "
                    "(write e.g. 10.0.0.0/8 or 127.0.0.1/32)") from e
        return self


class ServingSettings(_Section):
    """The captioning backend. Defaults are DataFlow-MM's LocalModelVLMServing_vllm values."""

    backend: Literal["vllm", "openai", "transformers"] = Field(
        "vllm", description="vllm (in-process engine), openai (OpenAI server), transformers.")
    model: str = Field(
        DEFAULT_MODEL, description="Hugging Face model id or local directory.")
    download_dir: Path | None = Field(
        None, description="Where model weights are downloaded (unset: the Hugging Face cache).")
    served_model_name: str | None = Field(
        None, description="Model name sent to an openai server (unset: serving.model).")
    tensor_parallel_size: int = Field(1, ge=1,
        description="GPUs the vLLM engine shards the model over.")
    temperature: float = Field(0.7, ge=0,
        description="Sampling temperature (0: greedy).")
    top_p: float = Field(0.9, gt=0, le=1,
        description="Nucleus sampling: keep the smallest token set with this probability.")
    top_k: int = Field(
        -1, description="Keep only the k likeliest tokens (-1: all).")
    repetition_penalty: float = Field(1.0, gt=0,
        description="Penalty on repeated tokens (1: none).")
    # The default and the ceiling of one request's completion tokens: an event's
    # options.sampling.max_tokens is clamped to it (captionflow.event_limits).
    max_tokens: int = Field(2048, ge=1,
        description="Most tokens generated per request; an event's max_tokens is clamped to it.")
    seed: int | None = Field(
        None, description="Sampling seed (unset: random).")
    # Ceilings on what one event may ask for; over them the event is refused as
    # invalid_request (captionflow.event_limits). The token default covers one prompt over
    # 512 windows plus a summary at the default max_tokens.
    max_prompts_per_event: int = Field(16, ge=1, le=16,
        description="Most named prompts one event may ask for (more: invalid_request).")
    max_completion_tokens_per_event: int = Field(1_100_000, ge=1,
        description="Most completion tokens one event's requests may reserve, over prompts, "
                    "windows, summaries and quality-gate retries (more: invalid_request).")
    max_json_schema_bytes: int = Field(16_384, ge=2,
        description="Largest options.json_schema an event may send, as compact JSON "
                    "(larger: invalid_request).")
    # Engine fields left unset are filled in at start-up by captionflow.serving.engine_plan
    # (max_model_len clamped to the model's limit; on a CPU also dtype, enforce_eager and
    # kv_cache_memory_bytes); fields given explicitly are kept, or refused with the fix.
    max_model_len: int = Field(51200, ge=16)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1,
        description="Share of GPU memory the vLLM engine may take.")
    dtype: str = "auto"
    max_num_seqs: int | None = Field(None, ge=1,
        description="Most sequences the engine runs at once (unset: vLLM's default).")
    # vLLM's tokens per scheduler step, which also sizes its encoder cache: it must hold the
    # largest video the video.* sampling budgets allow (unset: sized so). It may be below
    # max_model_len, since long prompts are prefilled in chunks.
    max_num_batched_tokens: int | None = Field(None, ge=16)
    enforce_eager: bool = Field(
        False, description="Run vLLM without CUDA graphs or compilation.")
    # CPU engine: bytes of KV cache (vLLM's VLLM_CPU_KVCACHE_SPACE only takes whole GiB);
    # unset on a CPU: a share of free memory.
    kv_cache_memory_bytes: int | None = Field(None, gt=0)
    # "image" > 0 sends up to that many of an event's `image` references to the model (before
    # the video); 0, the default, carries them through to the caption event unsent.
    limit_mm_per_prompt: dict[str, int] = Field(default_factory=lambda: {"image": 0, "video": 1})
    mm_processor_kwargs: dict[str, Any] = Field(default_factory=dict,
        description="Extra arguments for the model's multimodal processor.")
    trust_remote_code: bool = Field(
        False, description="Allow a model's own code from its repository.")
    # Where vLLM keeps its cache, RPC sockets and temp files (VLLM_CACHE_ROOT,
    # VLLM_RPC_BASE_PATH, TMPDIR). Unset: sockets and temp files in a fresh temp dir, the
    # cache where vLLM keeps it by default (~/.cache/vllm), kept between runs.
    work_dir: Path | None = None
    system_prompt: str = Field(
        DEFAULT_SYSTEM_PROMPT, description="System message of every request.")
    default_prompt: str = Field(
        DEFAULT_PROMPT, description="User prompt when an event gives none.")
    # Windowed videos: one more text-only request turns the window captions (with their
    # timestamps) into one caption; an event's options.summarize overrides this.
    summarize_windows: bool = False
    summary_prompt: str = Field(
        DEFAULT_SUMMARY_PROMPT,
        description="Prompt of the request that summarizes window captions.")
    # Named JSON Schemas an event may pick with options.json_schema_name.
    json_schemas: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # openai backend
    openai_base_url: str = "http://127.0.0.1:8000/v1"
    openai_api_key: SecretStr | None = Field(
        None, description="Bearer token for the openai backend's server; never logged.")
    openai_timeout_s: float = Field(600.0, gt=0,
        description="HTTP timeout of one request to the openai server.")
    # Deadline of one caption request in any backend, queueing inside the engine included;
    # a request past it fails with engine_timeout (a dependency error).
    request_timeout_s: float = Field(600.0, gt=0)
    # A server's Retry-After is obeyed up to this many seconds.
    retry_after_max_s: float = Field(30.0, ge=0)
    openai_max_concurrency: int = Field(16, ge=1,
        description="Most requests in flight to the openai server.")
    # Extra POSTs inside one attempt of the worker's retry layer (worker.max_attempts), so
    # one failing call makes max_attempts * (openai_max_retries + 1) POSTs (docs/errors.md).
    # 0 leaves retries to that one layer, which also waits out outages without charging.
    openai_max_retries: int = Field(0, ge=0,
        description="Extra POSTs inside one attempt for 5xx and connection errors.")
    openai_retry_backoff_ms: int = Field(500, ge=0,
        description="First backoff between those retries (doubling, with jitter).")
    # How the openai backend sends a clip: its sampled frames, inline. There is no "url"
    # transport: a server fetching references itself would bypass the worker's fetch
    # guards (allowed roots and networks, size and time limits) and its sampling.
    openai_video_transport: Literal["frames"] = Field(
        "frames", description="How the openai backend sends a clip: its sampled frames, inline.")
    # Captions sampled with temperature > 0 and no seed are cached too (a caption is a
    # caption); false makes such requests bypass the caption cache.
    cache_sampled: bool = Field(
        True, description="Cache captions sampled with temperature > 0 and no seed too.")

    @model_validator(mode="after")
    def _event_ceilings(self) -> ServingSettings:
        if self.max_completion_tokens_per_event < self.max_tokens:
            raise ValueError(
                f"serving.max_completion_tokens_per_event ({self.max_completion_tokens_per_event})"
                f" must be at least serving.max_tokens ({self.max_tokens}), or no event fits")
        return self


class WorkerSettings(_Section):
    group_id: str = Field(
        "captionflow-workers", description="Kafka consumer group of the workers.")
    # Static group membership (Kafka's group.instance.id): a worker restarted with the same
    # id within session_timeout_ms takes its partitions back without a rebalance of the
    # others. Unique per live worker (the pod name); unset: dynamic membership.
    group_instance_id: str | None = Field(None, min_length=1, max_length=249,
        description="Static member id (the pod name); unset: dynamic membership.")
    max_batch_size: int = Field(8, ge=1,
        description="Most events handed to the engine in one micro-batch.")
    max_wait_ms: int = Field(50, ge=0,
        description="Longest a micro-batch waits to fill before it is sent.")
    # Requests inside the engine at once (running + queued there); unset: sized from the
    # engine (captionflow.consumer.sizing): its running capacity plus one micro-batch.
    max_in_engine: int | None = Field(None, ge=1,
        description="Most requests inside the engine at once; unset: sized from the engine.")
    # Pause partitions above the high watermark of in-flight events, resume below the low.
    # Left unset, both are sized from the engine so that it never runs dry (sizing.py).
    max_in_flight: int = Field(32, ge=1)
    resume_in_flight: int = Field(16, ge=0,
        description="Partitions resume when in-flight events fall below this.")
    # One slow record cannot pile up finished records above the commit point (what a crash
    # replays) without bound.
    max_uncommitted_per_partition: int = Field(1000, ge=1,
        description="A partition is not fetched while its oldest unfinished record is this "
                    "many records behind its newest consumed one.")
    commit_interval_ms: int = Field(1000, ge=10,
        description="How often finished offsets are committed.")
    poll_timeout_ms: int = Field(200, ge=1,
        description="Longest one poll of the broker waits for records.")
    max_poll_records: int = Field(64, ge=1,
        description="Most records one poll returns.")
    max_attempts: int = Field(3, ge=1,
        description="Tries of a record that fails with a retriable event error.")
    retry_backoff_ms: int = Field(200, ge=0,
        description="First backoff between those tries (doubling, with jitter).")
    retry_backoff_max_ms: int = Field(5000, ge=0,
        description="Cap of that backoff.")
    shutdown_grace_s: float = Field(25.0, gt=0,
        description="On SIGTERM, how long in-flight events may finish before exit.")
    # Unfinished work keeps running either way and is kept if its partition comes back;
    # only work on partitions that moved is cancelled.
    revoke_grace_s: float = Field(10.0, ge=0,
        description="On revoke, how long to wait for unfinished records that hold finished "
                    "ones back from the commit (0: rejoin at once).")
    session_timeout_ms: int = Field(10_000, gt=0,
        description="Consumer-group session timeout: a silent member is expelled after it.")
    heartbeat_interval_ms: int = Field(3_000, gt=0,
        description="Consumer-group heartbeat interval.")
    max_poll_interval_ms: int = Field(300_000, gt=0,
        description="Longest gap between polls before the member is expelled.")
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="Where a group without committed offsets starts reading.")
    # Liveness: a record must have finished within this many seconds, unless there was
    # nothing to do (idle, or waiting on a dependency that is down and being probed).
    liveness_timeout_s: float = Field(60.0, gt=0)
    # How long the group coordinator waits for this member to rejoin during a rebalance;
    # must cover the revoke drain, the publishes in progress and the commit, or the member is
    # expelled.
    rebalance_timeout_ms: int = Field(60_000, gt=0)
    # Bound on one offset commit (revoke, shutdown, interval).
    commit_timeout_ms: int = Field(5_000, gt=0)
    # Engine stall: requests in flight and no token back for engine_stall_s -> not ready;
    # for engine_stall_exit_s -> exit non-zero, nothing unfinished committed.
    engine_stall_s: float = Field(60.0, gt=0)
    engine_stall_exit_s: float = Field(300.0, gt=0)
    # Dependency outages: probe with capped exponential backoff (with jitter) until the
    # dependency answers; each probe gets probe_timeout_s.
    probe_backoff_initial_ms: int = Field(500, gt=0)
    probe_backoff_max_ms: int = Field(15_000, gt=0,
        description="Cap of the probe backoff.")
    probe_timeout_s: float = Field(5.0, gt=0)
    # The broker unreachable this long: exit non-zero so fresh clients reconnect (0 = never).
    broker_down_exit_s: float = Field(600.0, ge=0)
    # Poison guard (off with dead_letter_max_ratio=1): when more than this share of the last
    # poison_window_records records were dead-lettered with one code, stop consuming and turn
    # not ready, so a bad deploy cannot drain a topic into the dead-letter topic.
    dead_letter_max_ratio: float = Field(0.9, gt=0, le=1)
    poison_window_records: int = Field(200, ge=1)
    # Dead-letter events carry at most this prefix of the raw payload (plus its size and
    # sha256), so they always fit the producer's limit.
    dead_letter_payload_max_bytes: int = Field(65_536, ge=0)
    # Quality gate (docs/captions.md): a caption whose status is truncated, repetitive or
    # invalid_json is asked for again up to quality_gate_retries times (0 = off), with the
    # repetition penalty raised by (quality_gate_repetition_penalty - 1) per retry and at
    # least quality_gate_temperature; the best attempt is kept.
    quality_gate_retries: int = Field(2, ge=0)
    quality_gate_repetition_penalty: float = Field(1.2, ge=1)
    quality_gate_temperature: float = Field(0.7, ge=0)

    @model_validator(mode="after")
    def _watermarks(self) -> WorkerSettings:
        # A resume watermark left unset is sized below the high one (consumer/sizing.py), so
        # only one given explicitly can contradict it.
        if "resume_in_flight" in self.model_fields_set \
                and self.resume_in_flight >= self.max_in_flight:
            raise ValueError("worker.resume_in_flight must be below worker.max_in_flight")
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError("worker.heartbeat_interval_ms must be below worker.session_timeout_ms")
        if self.revoke_grace_s * 1000 >= self.max_poll_interval_ms:
            raise ValueError("worker.revoke_grace_s must fit inside worker.max_poll_interval_ms")
        # A revoke waits up to revoke_grace_s for holes, then up to commit_timeout_ms for
        # outputs already on their way to the broker, then commits (commit_timeout_ms).
        if self.rebalance_timeout_ms < self.revoke_grace_s * 1000 + 2 * self.commit_timeout_ms:
            raise ValueError(
                f"worker.rebalance_timeout_ms ({self.rebalance_timeout_ms}) must cover "
                f"worker.revoke_grace_s ({self.revoke_grace_s} s) plus twice "
                f"worker.commit_timeout_ms ({self.commit_timeout_ms}, the publishes in progress "
                "and the commit); otherwise a draining member misses the rejoin "
                "deadline and its commit fails: raise it or lower revoke_grace_s")
        if self.engine_stall_exit_s <= self.engine_stall_s:
            raise ValueError("worker.engine_stall_exit_s must be above worker.engine_stall_s")
        if self.probe_backoff_max_ms < self.probe_backoff_initial_ms:
            raise ValueError(
                "worker.probe_backoff_max_ms must not be below worker.probe_backoff_initial_ms")
        return self


class CacheSettings(_Section):
    """The caption cache (docs/captions.md): captions keyed by what was asked, shared by
    every driver (worker, ``captionflow run``, the DataFlow API) that points at one store."""

    enabled: bool = Field(True, description="Look captions up in the cache and store new ones.")
    # "file:///dir" or a plain path (one machine), "s3://bucket/prefix/" (a fleet); empty:
    # a directory under the user's cache dir (XDG_CACHE_HOME, else ~/.cache).
    store: str = ""
    # Bound on one lookup or one write; past it the caption is made as if uncached.
    timeout_ms: int = Field(2_000, gt=0)
    # After a store error, lookups and writes skip the store this long (an outage costs
    # each caption nothing, not timeout_ms).
    retry_after_ms: int = Field(5_000, ge=0)
    # Named in every key, so captions of another checkpoint under the same name never hit;
    # unset: a fingerprint of a local model directory (config and weight file sizes), or
    # the model name alone for a hub id (set this to its commit for a hub model).
    model_revision: str | None = None

    @field_validator("store")
    @classmethod
    def _store_scheme(cls, value: str) -> str:
        scheme = value.split("://", 1)[0].lower() if "://" in value else "file"
        if scheme not in ("file", "s3"):
            raise ValueError(f"cache.store scheme {scheme!r} is not one of file, s3 "
                             "(write file:///dir, a path, or s3://bucket/prefix/)")
        return value


class MetricsSettings(_Section):
    enabled: bool = Field(
        True, description="Serve /metrics, /healthz and /readyz.")
    host: str = Field(
        "0.0.0.0", description="Address the metrics and health endpoints listen on.")
    port: int = Field(9400, ge=0, le=65535,
        description="Port of the metrics and health endpoints (0: any free port).")


class SinkSettings(_Section):
    """`captionflow sink`: the caption (and dead-letter) topic into a dataset
    (docs/sink.md)."""

    # A local directory, or s3://bucket/prefix/ (the AWS chain, as for video reads).
    to: str | None = None
    group_id: str = Field("captionflow-sink", description="Kafka consumer group of the sinks.")
    format: Literal["parquet", "jsonl", "jsonl.gz"] = Field(
        "parquet", description="File format of the dataset.")
    # Hive-style folders, outermost first: "partition" (the Kafka partition), "date" (the
    # UTC date of the event's created_at), or any top-level field of the event.
    partition_by: tuple[str, ...] = ("partition",)
    # A Kafka partition's buffered records become files when any of these is reached.
    flush_records: int = Field(10_000, ge=1)
    # Bytes of the records as consumed (JSON), not of the file written.
    flush_bytes: int = Field(32 * 1024**2, ge=1)
    flush_interval_s: float = Field(60.0, gt=0,
        description="A partition's buffered records become files at least this often.")
    # Also sink topics.dead_letter, into a dataset of its own.
    dead_letter: bool = False
    parquet_compression: Literal["zstd", "snappy", "gzip", "none"] = Field(
        "zstd", description="Parquet compression codec.")
    # Files above this size go up as a multipart upload in parts of this size (S3 wants
    # at least 5 MiB per part but the last); smaller ones in one PUT.
    s3_part_bytes: int = Field(8 * 1024**2, ge=1)
    # Overrides video.s3_endpoint_url for the dataset (videos and dataset in two stores).
    s3_endpoint_url: str | None = None
    poll_timeout_ms: int = Field(500, ge=1,
        description="Longest one poll of the broker waits for records.")
    max_poll_records: int = Field(2_000, ge=1, description="Most records one poll returns.")
    session_timeout_ms: int = Field(10_000, gt=0,
        description="Consumer-group session timeout of the sink.")
    heartbeat_interval_ms: int = Field(3_000, gt=0,
        description="Consumer-group heartbeat interval of the sink.")
    commit_timeout_ms: int = Field(10_000, gt=0,
        description="Longest one offset commit may take before it counts as failed.")
    # A failed write or commit is retried with capped exponential backoff and jitter,
    # while the partition stays paused and /readyz answers 503.
    retry_backoff_initial_ms: int = Field(500, gt=0)
    retry_backoff_max_ms: int = Field(15_000, gt=0,
        description="Cap of the backoff between retries of a failed write or commit.")
    probe_interval_s: float = Field(5.0, gt=0,
        description="How often the store and the broker are probed for /readyz.")
    probe_timeout_s: float = Field(5.0, gt=0, description="Longest one probe may take.")
    # SIGTERM: flush what is buffered and commit it within this many seconds.
    shutdown_grace_s: float = Field(25.0, gt=0)
    liveness_timeout_s: float = Field(120.0, gt=0,
        description="/healthz fails when the sink loop made no progress for this long.")
    # Its own port, so that a worker and a sink can run on one host.
    metrics_port: int = Field(9410, ge=0, le=65535)

    @model_validator(mode="after")
    def _check(self) -> SinkSettings:
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError("sink.heartbeat_interval_ms must be below sink.session_timeout_ms")
        if self.retry_backoff_max_ms < self.retry_backoff_initial_ms:
            raise ValueError(
                "sink.retry_backoff_max_ms must not be below sink.retry_backoff_initial_ms")
        if not self.partition_by:
            raise ValueError('sink.partition_by needs at least one folder level, e.g. '
                             '["partition"]')
        if len(set(self.partition_by)) != len(self.partition_by):
            raise ValueError("sink.partition_by names a field twice")
        return self


_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "captionflow_config_file", default=None)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        frozen=True, extra="forbid", env_prefix=ENV_PREFIX, env_nested_delimiter="__",
        # Off, so each section's ``model_fields_set`` holds exactly the fields the user gave
        # (file, environment, flags): the engine plan fills in only the others.
        nested_model_default_partial_update=False)

    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    video: VideoSettings = VideoSettings()
    serving: ServingSettings = ServingSettings()
    worker: WorkerSettings = WorkerSettings()
    metrics: MetricsSettings = MetricsSettings()
    cache: CacheSettings = CacheSettings()
    sink: SinkSettings = SinkSettings()

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _config_file.get()
        if path is not None:
            if path.suffix == ".toml":
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            else:
                sources.append(JsonConfigSettingsSource(settings_cls, json_file=path))
        return tuple(sources)

    @classmethod
    def load(cls, config_file: str | Path | None = None,
             overrides: dict[str, Any] | None = None) -> Settings:
        """Build the settings once; raise :class:`ConfigError` with every problem listed."""
        path = config_file or os.environ.get(f"{ENV_PREFIX}CONFIG")
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist")
            if path.suffix not in (".toml", ".json"):
                raise ConfigError(f"config file {path} must be .toml or .json")
        token = _config_file.set(path)
        try:
            return cls(**_nest(overrides or {}))
        except ValidationError as e:
            raise ConfigError(_explain(e)) from e
        finally:
            _config_file.reset(token)


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"serving.max_tokens": 5}`` -> ``{"serving": {"max_tokens": 5}}``; None is dropped."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        if value is None:
            continue
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _explain(e: ValidationError) -> str:
    lines = ["invalid settings:"]
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        env = ENV_PREFIX + "__".join(str(p) for p in err["loc"]).upper()
        lines.append(f"  {where}: {err['msg']} (env {env})")
    return "\n".join(lines)


def setting_names() -> set[str]:
    """Every dotted setting name, e.g. ``worker.max_batch_size`` (deploy files are checked
    against these)."""
    names = set()
    for section, field in Settings.model_fields.items():
        for name in field.annotation.model_fields:  # type: ignore[union-attr]
            names.add(f"{section}.{name}")
    return names
