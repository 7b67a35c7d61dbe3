"""``captionflow run``: a DataFlow rows file captioned into a DataFlow step file, in this
process or on a Ray cluster (``--ray``)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from captionflow.cli_common import ConfigOpt, VerboseOpt, err, fail, load_settings
from captionflow.config import Settings
from captionflow.errors import CaptionflowError, ConfigError
from captionflow.logs import setup_logging


def run(
    input_path: Annotated[Path, typer.Option(
        "--input", "-i",
        help="DataFlow rows: a JSON list, JSONL (one row per line), .csv or .parquet.",
        exists=True, dir_okay=False)],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Output file; default {cache-path}/{prefix}_step{N}.{type}.")
    ] = None,
    cache_path: Annotated[Path, typer.Option(help="DataFlow FileStorage cache_path.")
                          ] = Path("./cache"),
    file_name_prefix: Annotated[str, typer.Option(help="DataFlow FileStorage file_name_prefix.")
                                ] = "dataflow_cache_step",
    cache_type: Annotated[str | None, typer.Option(
        help="json | jsonl | csv | parquet; default json, or --output's suffix.")] = None,
    step: Annotated[int, typer.Option(help="Step number N of the output file.", min=1)] = 1,
    input_video_key: Annotated[str, typer.Option()] = "video",
    input_image_key: Annotated[str, typer.Option()] = "image",
    input_conversation_key: Annotated[str, typer.Option()] = "conversation",
    output_key: Annotated[str, typer.Option()] = "caption",
    concurrency: Annotated[int | None, typer.Option(
        help="Rows in flight at once (default worker.max_in_flight, or serving.max_num_seqs "
             "+ video.decode_workers when fewer); with --ray, per engine actor.",
        min=1)] = None,
    resume: Annotated[bool, typer.Option(
        help="Keep rows the output file already has captions for.")] = True,
    fail_on_error: Annotated[bool, typer.Option(
        "--fail-on-error", help="Exit 1 when any row failed.")] = False,
    prompt: Annotated[str | None, typer.Option(
        help="Prompt for rows whose human turn is empty (serving.default_prompt).")] = None,
    backend: Annotated[str | None, typer.Option(
        help="vllm | openai | transformers (serving.backend).")] = None,
    model: Annotated[str | None, typer.Option(help="Model name or path (serving.model).")] = None,
    allowed_root: Annotated[list[Path] | None, typer.Option(
        help="Directory local video paths must lie under (repeatable; video.allowed_roots; "
             "default: any file you can read, relative paths from the current directory).")
    ] = None,
    ray: Annotated[bool, typer.Option(
        "--ray", help="Run on a Ray cluster (pip install 'captionflow[ray]'): decode in CPU "
                      "tasks, caption in engine actors. The same rows in and out.")] = False,
    ray_address: Annotated[str | None, typer.Option(
        help="With --ray: auto, or ray://HOST:PORT. Default: RAY_ADDRESS when set (as in "
             "a Ray job), else a new local cluster.")] = None,
    ray_engines: Annotated[int | None, typer.Option(
        help="With --ray: engine actors (default 1), each with "
             "serving.tensor_parallel_size GPUs on a GPU cluster.", min=1)] = None,
    config: ConfigOpt = None, verbose: VerboseOpt = False,
) -> None:
    """Caption the videos of a DataFlow JSON/JSONL file into a DataFlow step file."""
    from captionflow.batch.files import cache_type_of, check_cache_type, step_path
    from captionflow.batch.job import run_file
    from captionflow.batch.progress import row_progress
    from captionflow.batch.remote import remote_url
    from captionflow.batch.rows import RowKeys
    from captionflow.serving.factory import make_backend

    setup_logging(verbose)
    settings = load_settings(config, **{
        "serving.backend": backend, "serving.model": model, "serving.default_prompt": prompt,
        "video.allowed_roots": tuple(allowed_root) if allowed_root else None})
    try:
        kind = check_cache_type(cache_type or (cache_type_of(output) if output else "json"))
        target = output or step_path(cache_path, file_name_prefix, step, kind)
        target = remote_url(target) or target  # an s3:// URL that Path folded to s3:/
    except CaptionflowError as e:
        raise fail(e, 2) from e
    keys = RowKeys(video=input_video_key, image=input_image_key,
                   conversation=input_conversation_key, output=output_key)
    if not ray and (ray_address is not None or ray_engines is not None):
        raise fail(ConfigError("--ray-address and --ray-engines only apply with --ray: add "
                               "--ray to run on a Ray cluster"), 2)
    if ray:
        report = _run_on_ray(input_path, target, kind, settings, keys, address=ray_address,
                             engines=ray_engines or 1, resume=resume,
                             rows_per_engine_batch=concurrency)
        _run_exit(report, fail_on_error)
        return
    serving = make_backend(settings.serving, settings.video)

    async def go() -> Any:
        try:
            with row_progress(err) as progress:
                return await run_file(input_path, target, cache_type=kind, settings=settings,
                                      backend=serving, keys=keys, concurrency=concurrency,
                                      resume=resume, on_row=progress.on_row,
                                      on_total=progress.on_total)
        finally:
            await serving.close()

    try:
        report = asyncio.run(go())
    except CaptionflowError as e:
        raise fail(e, 2 if e.code in ("config_invalid", "schema_invalid") else 1) from e
    err.print(f"{report.summary()} -> {target}", soft_wrap=True, markup=False)
    print(orjson.dumps({"output": str(target), **report.as_dict()}).decode())
    _run_exit(report, fail_on_error)


def _run_exit(report: Any, fail_on_error: bool) -> None:
    nothing_ran = report.total > 0 and report.captioned + report.skipped == 0
    if nothing_ran or (fail_on_error and report.failed_total):
        raise typer.Exit(1)


def _run_on_ray(input_path: Path, target: Any, kind: Any, settings: Settings, keys: Any, *,
                address: str | None, engines: int, resume: bool,
                rows_per_engine_batch: int | None) -> Any:
    """``run --ray``: the same rows in and out, on Ray (captionflow/ray/job.py);
    ``--concurrency`` is the rows each engine actor takes at a time."""
    from captionflow.batch.progress import row_progress

    try:
        import ray  # noqa: F401  (an optional extra)
    except ImportError as e:
        raise fail(ConfigError(f"--ray needs Ray: pip install 'captionflow[ray]' ({e})")) from e
    from captionflow.ray.job import RayPlan, run_ray_file

    try:
        with row_progress(err) as progress:
            report, stats = run_ray_file(
                input_path, target, cache_type=kind, settings=settings, keys=keys,
                plan=RayPlan(address=address, engines=engines,
                             caption_batch_rows=rows_per_engine_batch), resume=resume,
                on_row=progress.on_row, on_total=progress.on_total)
    except CaptionflowError as e:
        raise fail(e, 2 if e.code in ("config_invalid", "schema_invalid") else 1) from e
    err.print(f"{report.summary()} on Ray ({stats.engines} engines, idle "
              f"{stats.engine_wait_s:.1f} s waiting for rows) -> {target}",
              soft_wrap=True, markup=False)
    print(orjson.dumps({"output": str(target), **report.as_dict(),
                        "ray": stats.as_dict()}).decode())
    return report
