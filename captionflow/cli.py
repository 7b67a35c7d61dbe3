"""The ``captionflow`` command. Settings are built here, once, and passed down as values."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console

from captionflow import cli_batch, cli_examples
from captionflow.cli_common import (
    BootstrapOpt,
    ConfigOpt,
    VerboseOpt,
    err,
    fail,
    load_settings,
)
from captionflow.config import KafkaSettings
from captionflow.errors import CaptionflowError
from captionflow.logs import setup_logging

app = typer.Typer(
    name="captionflow", no_args_is_help=True, add_completion=False,
    pretty_exceptions_show_locals=False,
    help="Stream-scale video captioning: Kafka in, Qwen2.5-VL on vLLM, captions out.")
# Where `captionflow broker` listens: kafka.bootstrap_servers' default.
DEFAULT_BROKER_PORT = int(KafkaSettings().bootstrap_servers.rsplit(":", 1)[1])


@app.command()
def broker(
    port: Annotated[int, typer.Option(
        help="Port on 127.0.0.1; the default is the one every other command uses. "
             "0 = a free one.")] = DEFAULT_BROKER_PORT,
    partitions: Annotated[int | None, typer.Option(help="Partitions per topic.")] = None,
    config: ConfigOpt = None, verbose: VerboseOpt = False,
) -> None:
    """Run the embedded Kafka-protocol broker (Tansu) with the three topics created."""
    from captionflow.broker import EmbeddedBroker, port_free

    setup_logging(verbose)
    settings = load_settings(config, **{"topics.partitions": partitions})
    t = settings.topics
    if port and not port_free("127.0.0.1", port):
        err.print(f"[red]error:[/red] port {port} on 127.0.0.1 is taken (another broker, or "
                  "another program). `captionflow broker --port 0` picks a free port; then "
                  "give the other commands its address with --bootstrap-servers.")
        raise typer.Exit(1)
    b = EmbeddedBroker(port=port or None, topics=(t.input, t.output, t.dead_letter),
                       partitions=t.partitions)

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        b.start()
    except CaptionflowError as e:
        raise fail(e) from e
    except KeyboardInterrupt:
        b.stop()
        return
    print(f"bootstrap servers: {b.bootstrap_servers}", flush=True)
    if b.bootstrap_servers == KafkaSettings().bootstrap_servers:
        how = "the other commands find it with their default settings"
    else:
        how = f"give the other commands --bootstrap-servers {b.bootstrap_servers}"
    err.print(f"topics {t.input}, {t.output}, {t.dead_letter} ({t.partitions} partitions); "
              f"{how}; Ctrl-C stops it", soft_wrap=True)

    try:
        code = b.wait()
    except KeyboardInterrupt:
        code = 0
    finally:
        b.stop()
    if code != 0:
        err.print(f"[red]broker exited with code {code}[/red]")
        raise typer.Exit(1)


@app.command()
def topics(config: ConfigOpt = None, bootstrap_servers: BootstrapOpt = None,
           partitions: Annotated[int | None, typer.Option()] = None) -> None:
    """Create the input, output and dead-letter topics if they do not exist."""
    from captionflow.kafka import ensure_topics

    settings = load_settings(config, **{"kafka.bootstrap_servers": bootstrap_servers,
                                        "topics.partitions": partitions})
    t = settings.topics
    try:
        created = asyncio.run(ensure_topics(
            settings.kafka, (t.input, t.output, t.dead_letter), partitions=t.partitions,
            replication_factor=t.replication_factor))
    except CaptionflowError as e:
        raise fail(e) from e
    print(f"created: {', '.join(created) or 'nothing (all exist)'}")


@app.command()
def publish(
    inputs: Annotated[list[str], typer.Argument(
        help="Video files, directories, globs, URLs, s3://bucket/prefix/ (one event per "
             "video object), DataFlow JSON or JSONL files.")],
    id_from: Annotated[str, typer.Option(
        help="auto (row id, else uuid) | uuid | path (stable per reference) | field (row id)")
    ] = "auto",
    topic: Annotated[str | None, typer.Option(help="Override topics.input.")] = None,
    config: ConfigOpt = None, bootstrap_servers: BootstrapOpt = None, verbose: VerboseOpt = False,
) -> None:
    """Validate and publish video-reference events, keyed by event id."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from captionflow.producer import Publisher

    if id_from not in ("auto", "uuid", "path", "field"):
        raise typer.BadParameter("--id-from must be auto, uuid, path or field")
    setup_logging(verbose)
    logging.getLogger("captionflow.producer").setLevel(logging.ERROR)
    settings = load_settings(config, **{"kafka.bootstrap_servers": bootstrap_servers,
                                        "topics.input": topic})

    async def go() -> Any:
        with Progress(TextColumn("publishing"), BarColumn(), MofNCompleteColumn(),
                      console=err, transient=True, disable=not err.is_terminal) as progress:
            task = progress.add_task("publish", total=None)
            async with Publisher(settings.kafka, topic=settings.topics.input) as pub:
                return await pub.publish_inputs(
                    inputs, id_from=id_from,  # type: ignore[arg-type]
                    on_sent=lambda ev, meta: progress.advance(task), video=settings.video)

    try:
        report = asyncio.run(go())
    except CaptionflowError as e:
        raise fail(e) from e
    for ev, meta in report.sent:
        print(orjson.dumps({"id": ev.id, "video": ev.video, "partition": meta.partition,
                            "offset": meta.offset}).decode())
    for r in report.rejected:
        err.print(f"[yellow]rejected[/yellow] {r.source}: {r.reason}")
    err.print(f"sent {len(report.sent)}, rejected {len(report.rejected)} "
              f"to {settings.topics.input}")
    if report.rejected:
        raise typer.Exit(1)


@app.command()
def subscribe(
    count: Annotated[int | None, typer.Option(help="Stop after this many records.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
    dead_letter: Annotated[bool, typer.Option(
        "--dead-letter", help="Also read the dead-letter topic.")] = False,
    only_dead_letter: Annotated[bool, typer.Option(
        "--only-dead-letter", help="Read only the dead-letter topic.")] = False,
    latest: Annotated[bool, typer.Option("--latest", help="Only new records.")] = False,
    group: Annotated[str | None, typer.Option(help="Join this group and commit.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="JSONL file.")] = None,
    config: ConfigOpt = None, bootstrap_servers: BootstrapOpt = None, verbose: VerboseOpt = False,
) -> None:
    """Print caption events (and dead-letter events) as JSON lines."""
    from aiokafka.errors import KafkaError

    from captionflow.consumer.subscriber import subscribe as run_subscribe
    from captionflow.kafka import start_error

    setup_logging(verbose)
    settings = load_settings(config, **{"kafka.bootstrap_servers": bootstrap_servers})
    t = settings.topics
    names = [t.dead_letter] if only_dead_letter else \
        [t.output, t.dead_letter] if dead_letter else [t.output]
    out = output.open("ab") if output else sys.stdout.buffer

    def sink(record: Any) -> None:
        out.write(record.value.rstrip(b"\n") + b"\n")
        out.flush()

    try:
        result = asyncio.run(run_subscribe(
            settings.kafka, names, sink=sink, from_beginning=not latest, count=count,
            timeout_s=timeout, group_id=group))
    except KeyboardInterrupt:
        return
    except CaptionflowError as e:  # start_client named the cause
        raise fail(e) from e
    except (KafkaError, OSError) as e:
        raise fail(asyncio.run(start_error(e, settings.kafka, client="subscriber"))) from e
    finally:
        if output:
            out.close()
    if count is not None and result.records < count:
        err.print(f"timed out after {result.records} of {count} records")
        raise typer.Exit(1)


@app.command()
def sink(
    to: Annotated[str | None, typer.Option(
        "--to", help="Destination: a local directory or s3://bucket/prefix/ (sink.to).")] = None,
    file_format: Annotated[str | None, typer.Option(
        "--format", help="parquet | jsonl | jsonl.gz (sink.format).")] = None,
    partition_by: Annotated[list[str] | None, typer.Option(
        "--partition-by", help="Hive folder level, outermost first (repeatable): partition "
                               "(Kafka's), date (the event's), or a top-level field such as "
                               "model (sink.partition_by).")] = None,
    flush_records: Annotated[int | None, typer.Option(
        help="Roll a partition's file at this many records (sink.flush_records).")] = None,
    flush_bytes: Annotated[int | None, typer.Option(
        help="... or at this many bytes of records (sink.flush_bytes).")] = None,
    flush_interval_s: Annotated[float | None, typer.Option(
        help="... or when its oldest record has waited this long (sink.flush_interval_s).")
    ] = None,
    dead_letter: Annotated[bool, typer.Option(
        "--dead-letter", help="Also sink the dead-letter topic (sink.dead_letter).")] = False,
    group: Annotated[str | None, typer.Option(help="Consumer group (sink.group_id).")] = None,
    metrics_port: Annotated[int | None, typer.Option(
        help="Port of /metrics, /healthz, /readyz (sink.metrics_port); 0 = any free.")] = None,
    config: ConfigOpt = None, bootstrap_servers: BootstrapOpt = None, verbose: VerboseOpt = False,
) -> None:
    """Write caption events (and dead letters) into Parquet or JSONL files, exactly once."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_before_start)
    setup_logging(verbose, service=True)
    from captionflow.sink.service import Sink

    settings = load_settings(config, **{
        "kafka.bootstrap_servers": bootstrap_servers, "sink.to": to,
        "sink.format": file_format,
        "sink.partition_by": tuple(partition_by) if partition_by else None,
        "sink.flush_records": flush_records, "sink.flush_bytes": flush_bytes,
        "sink.flush_interval_s": flush_interval_s, "sink.dead_letter": dead_letter or None,
        "sink.group_id": group, "sink.metrics_port": metrics_port})

    async def go() -> int:
        service = Sink(settings)
        service.install_signal_handlers()
        return await service.run()

    try:
        code = asyncio.run(go())
    except CaptionflowError as e:
        raise fail(e) from e
    raise typer.Exit(code)


def _exit_before_start(signum: int, frame: object) -> None:
    raise SystemExit(0)


@app.command()
def serve(
    config: ConfigOpt = None, bootstrap_servers: BootstrapOpt = None,
    group: Annotated[str | None, typer.Option(help="Consumer group (worker.group_id).")] = None,
    backend: Annotated[str | None, typer.Option(
        help="vllm | openai | transformers (serving.backend).")] = None,
    model: Annotated[str | None, typer.Option(help="Model name or path (serving.model).")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="metrics.port; 0 = any free.")] = None,
    allowed_root: Annotated[list[Path] | None, typer.Option(
        help="Directory local video paths must lie under (repeatable; video.allowed_roots).")
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run a worker: consume video events, caption them, publish caption events."""
    # Until the worker's own handlers are installed (after the heavy imports), a stop
    # request simply ends the process: nothing has been consumed yet.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_before_start)
    setup_logging(verbose, service=True)
    from captionflow.consumer.service import Worker

    settings = load_settings(config, **{
        "kafka.bootstrap_servers": bootstrap_servers, "worker.group_id": group,
        "serving.backend": backend, "serving.model": model, "metrics.port": metrics_port,
        "video.allowed_roots": tuple(allowed_root) if allowed_root else None})

    async def run() -> int:
        worker = Worker(settings)
        worker.install_signal_handlers()
        return await worker.run()

    try:
        code = asyncio.run(run())
    except CaptionflowError as e:
        raise fail(e) from e
    raise typer.Exit(code)


app.command()(cli_batch.run)


@app.command()
def demo(
    model: Annotated[str | None, typer.Option(
        help="A real Qwen2.5-VL checkpoint (name or path). Default: a tiny random test model "
             "built locally.")] = None,
    videos: Annotated[int, typer.Option(help="Sample videos to caption (1-4).", min=1, max=4)
                      ] = 4,
    max_tokens: Annotated[int, typer.Option(help="Caption length limit.")] = 32,
    work_dir: Annotated[Path | None, typer.Option(
        help="Where videos, the model and engine files go (default: a temporary dir).")] = None,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 900,
    verbose: VerboseOpt = False,
) -> None:
    """Run everything locally: broker, sample videos, a worker; print the captions."""
    import shutil
    import tempfile

    from captionflow.demo import run_demo

    setup_logging(verbose)
    if not verbose:
        logging.getLogger().setLevel(logging.WARNING)
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    if model is None:  # the tiny model is built locally; nothing to download
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Console()
    temporary = work_dir is None
    root = Path(tempfile.mkdtemp(prefix="captionflow-demo-")) if work_dir is None else work_dir
    try:
        code = asyncio.run(run_demo(work_dir=root, model=model, videos=videos,
                                    max_tokens=max_tokens, timeout_s=timeout, console=out))
    except CaptionflowError as e:
        raise fail(e) from e
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
    raise typer.Exit(code)


@app.command()
def schema(name: Annotated[str, typer.Argument(help="video | caption | dead-letter")]) -> None:
    """Print the JSON Schema of an event."""
    from captionflow.schemas import jsonschema

    if name not in jsonschema.SCHEMAS:
        raise typer.BadParameter(f"choose one of {', '.join(jsonschema.SCHEMAS)}")
    sys.stdout.buffer.write(jsonschema.shipped(name))


app.command()(cli_examples.samples)
app.command("tiny-model")(cli_examples.tiny_model)


def main() -> None:
    try:
        app()
    except SystemExit as e:
        exit_now_if_done(e.code)
        raise
    exit_now_if_done(0)


def exit_now_if_done(code: object) -> None:
    """End the process without the interpreter's teardown once a command that loaded the
    engine's libraries has finished and closed everything it started: tearing down
    vLLM's and torch's thousands of modules takes seconds and frees nothing the exit
    would not. Outputs are closed by then; stdout, stderr and the log handlers are flushed
    here. With a child process or a non-daemon thread still alive the usual exit runs, so
    that whatever waits for them still does."""
    if "vllm" not in sys.modules or _still_running():
        return
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def _still_running() -> bool:
    """A child process (other than multiprocessing's resource tracker, which ends when this
    process does) or a non-daemon thread besides this one."""
    import multiprocessing
    import threading

    import psutil  # a vLLM dependency

    multiprocessing.active_children()  # reaps the engine core vLLM started
    tracker = getattr(sys.modules.get("multiprocessing.resource_tracker"),
                      "_resource_tracker", None)
    tracker_pid = getattr(tracker, "_pid", None)
    alive = []
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.pid != tracker_pid and child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child)
    return bool(alive) or any(
        t.is_alive() and not t.daemon and t is not threading.main_thread()
        for t in threading.enumerate())


if __name__ == "__main__":
    main()
