"""`captionflow run --ray` and the library form on a real local Ray cluster (2 CPUs, one per
module): the same output rows as `captionflow run`, bad rows with the same codes, and no
row lost or doubled when a decode task's process and an engine actor are SIGKILLed.

The engine actors run the transformers backend on the tiny model: it starts in seconds, so
the killed actor's restart is cheap, and `captionflow run` with the same settings (the
shared ``hf_backend_sync``) gives the reference greedily. The vLLM engine in an actor is
exercised by bench/bench_ray.py, which checks its captions against `captionflow run`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from captionflow.batch.files import read_rows
from captionflow.batch.job import run_file
from captionflow.config import ServingSettings, Settings
from tests.support.worker_fixtures import make_video

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
N_GOOD = 16


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """One local cluster for every test here: 2 CPUs (a decode task and an engine actor at
    once), a small object store, workers that import this checkout."""
    # Ray's sockets live in its temp dir: a short one (a unix socket path holds 107 bytes,
    # and the vLLM fixtures point TMPDIR deep into pytest's tree).
    temp_dir = tempfile.mkdtemp(prefix="cfray-", dir="/tmp")
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), old) if p)
    try:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 << 20,
                 log_to_driver=False, configure_logging=False, _temp_dir=temp_dir)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_settings(tiny_settings: ServingSettings) -> Settings:
    serving = tiny_settings.model_copy(update={"backend": "transformers"})
    # The quality gate off: one request per row (the tiny model's captions are truncated).
    return Settings(serving=serving, video={
        "fps": 2.0, "max_frames": 4, "min_frames": 2, "min_pixels": 28 * 28 * 4,
        "max_pixels": 112 * 84}, worker={"quality_gate_retries": 0})


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, str]]:
    """20 JSONL rows: 16 good videos (one with its own prompt, one with an id) and four bad
    rows, with the code each bad one must get."""
    root = tmp_path_factory.mktemp("ray-rows")
    videos = [make_video(root / f"v{n:02d}.mp4", seed=300 + n) for n in range(N_GOOD)]
    truncated = root / "truncated.mp4"
    truncated.write_bytes(videos[0].read_bytes()[: videos[0].stat().st_size * 6 // 10])
    human = [{"from": "human", "value": ""}]
    lines = [orjson.dumps({"video": [str(v)], "conversation": human, "n": n})
             for n, v in enumerate(videos)]
    lines[3] = orjson.dumps({"video": str(videos[3]), "n": 3,
                             "conversation": [{"from": "human", "value": "What moves?"}]})
    lines[5] = orjson.dumps({"id": "row-five", "video": [str(videos[5])], "n": 5})
    bad = {16: "video_not_found", 17: "video_unreadable", 18: "schema_invalid",
           19: "malformed_json"}
    lines += [orjson.dumps({"video": [str(root / "missing.mp4")], "conversation": human}),
              orjson.dumps({"video": [str(truncated)], "conversation": human}),
              orjson.dumps({"video": [], "conversation": human}),
              b'{"video": ["a.mp4"']
    path = root / "rows.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, bad


@pytest.fixture(scope="module")
def reference(rows_file: tuple[Path, dict[int, str]], ray_settings: Settings,
              hf_backend_sync: Any, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """`captionflow run`'s output file for the rows (same settings, same backend)."""
    out = tmp_path_factory.mktemp("ray-reference") / "out.jsonl"
    report = asyncio.run(run_file(rows_file[0], out, cache_type="jsonl",
                                  settings=ray_settings, backend=_Shared(hf_backend_sync)))
    assert (report.captioned, report.failed_total) == (N_GOOD, 4), report.summary()
    return out.read_bytes()


class _Shared:
    """The session's started backend; the session closes it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def close(self) -> None:
        pass


def test_run_ray_writes_what_captionflow_run_writes(
        ray_cluster: None, rows_file: tuple[Path, dict[int, str]], ray_settings: Settings,
        reference: bytes, tmp_path: Path) -> None:
    from captionflow.ray import RayPlan, run_ray_file

    path, bad = rows_file
    out = tmp_path / "out.jsonl"
    report, stats = run_ray_file(path, out, cache_type="jsonl", settings=ray_settings,
                                 plan=RayPlan(caption_batch_rows=4))
    assert (report.total, report.captioned, report.skipped) == (20, N_GOOD, 0)
    assert dict(report.failed) == {code: 1 for code in bad.values()}
    assert report.engine_started and stats.duplicates == 0
    # Byte for byte: captions (greedy), caption_* fields, error codes and messages, order.
    assert out.read_bytes() == reference
    rows = read_rows(out)
    assert {i: r["error"]["code"] for i, r in enumerate(rows) if r.get("error")} == bad
    assert rows[3]["conversation"][0]["value"] == "What moves?" and rows[3]["caption"]
    assert len({r["caption"] for r in rows[:N_GOOD]}) > 1  # distinct videos, distinct text

    # The rerun, as a user types it in a Ray job (whose driver finds the cluster in
    # RAY_ADDRESS): it keeps every caption and sends only the failed rows to Ray again,
    # which fail before reaching an engine.
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "PYTHONPATH": str(REPO), "CAPTIONFLOW_SERVING__BACKEND": "transformers",
           "CAPTIONFLOW_SERVING__MODEL": ray_settings.serving.model}
    again = subprocess.run(
        [sys.executable, "-m", "captionflow", "run", "--ray", "--input", str(path),
         "--output", str(out), "--fail-on-error"],
        env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1, again.stderr[-3000:]  # --fail-on-error: 4 rows failed
    summary = orjson.loads(again.stdout.strip().splitlines()[-1])
    assert (summary["captioned"], summary["skipped"]) == (0, N_GOOD), summary
    assert summary["failed"] == dict(report.failed) and summary["engine_started"] is False
    assert summary["ray"]["duplicates"] == 0
    assert out.read_bytes() == reference


def _pids_titled(fragment: str) -> list[int]:
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if fragment in " ".join(proc.info["cmdline"] or ()):
                found.append(proc.info["pid"])
        except psutil.Error:
            continue
    return found


def test_killed_decode_task_and_engine_actor_lose_no_row(
        ray_cluster: None, rows_file: tuple[Path, dict[int, str]], ray_settings: Settings,
        reference: bytes, tmp_path: Path) -> None:
    from captionflow.ray import RayPlan, run_ray_file

    path, bad = rows_file
    out = tmp_path / "out.jsonl"
    killed: dict[str, int] = {}
    stop = threading.Event()

    def kill_a_decode_task() -> None:
        # A decode task's process, while it runs a task (its title names the task).
        while not stop.is_set() and "decode" not in killed:
            for pid in _pids_titled("ray::MapBatches(decode_batch)"):
                os.kill(pid, signal.SIGKILL)
                killed["decode"] = pid
                return
            time.sleep(0.01)

    def on_row(index: int, outcome: str) -> None:
        # Once the first rows are back, the engine actor dies with the others in flight.
        if outcome == "captioned" and "actor" not in killed:
            # An earlier test's actor may still be on its way out: kill whatever holds an
            # engine, this job's actor among them.
            pids = _pids_titled("ray::MapWorker(MapBatches(CaptionActor))")
            assert pids, "no engine actor to kill"
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            killed["actor"] = pids[0]

    killer = threading.Thread(target=kill_a_decode_task, daemon=True)
    killer.start()
    try:
        report, stats = run_ray_file(path, out, cache_type="jsonl", settings=ray_settings,
                                     plan=RayPlan(decode_batch_rows=2, caption_batch_rows=2),
                                     on_row=on_row)
    finally:
        stop.set()
        killer.join(5)
    assert set(killed) == {"decode", "actor"}, killed
    assert (report.captioned, report.failed_total, stats.duplicates) == (N_GOOD, 4, 0)
    assert out.read_bytes() == reference  # every row once, in order, the same captions
    # The killed task's rows were decoded again (they are all here); the actor's rows
    # were captioned by its restarted process.
    assert stats.rows_after_restart > 0


def test_library_form_with_a_users_own_map_batches_step(
        ray_cluster: None, rows_file: tuple[Path, dict[int, str]], ray_settings: Settings,
        reference: bytes) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import ray.data

    from captionflow.ray import CaptionActor, decode_stage

    expected = [orjson.loads(line) for line in reference.splitlines()]
    videos = [r["video"][0] for r in expected[:N_GOOD] if r["n"] not in (3, 5)]
    videos.append(str(Path(videos[0]).with_name("missing.mp4")))

    def brightness(batch: pa.Table) -> pa.Table:
        # The user's step: keep rows that decoded, add their mean pixel value.
        from captionflow.ray.frames import column_arrays

        batch = batch.filter(pc.is_null(batch.column("captionflow_decode_error")))
        means = [float(np.mean(f)) for f in column_arrays(batch.column("captionflow_frames"))]
        return batch.append_column("brightness", pa.array(means, pa.float64()))

    ds = (ray.data.from_items([{"video": v, "clip": k} for k, v in enumerate(videos)])
          .map_batches(decode_stage(ray_settings), batch_format="pyarrow", batch_size=4)
          .map_batches(brightness, batch_format="pyarrow")
          .map_batches(CaptionActor, fn_constructor_kwargs={"settings": ray_settings},
                       batch_format="pyarrow", batch_size=4, concurrency=1))
    got = sorted(ds.take_all(), key=lambda r: r["clip"])
    assert [r["clip"] for r in got] == list(range(len(videos) - 1))  # the missing one dropped
    by_video = {r["video"][0]: r["caption"] for r in expected[:N_GOOD]}
    for row in got:
        assert row["caption"] == by_video[row["video"]], row  # greedy: the same caption
        assert row["captionflow_error"] is None and 0 < row["brightness"] < 255
        assert orjson.loads(row["captionflow_row"])["caption_status"] == "truncated"
        assert "captionflow_frames" not in row


def test_ray_answers_from_the_cache_that_captionflow_run_filled(
        ray_cluster: None, rows_file: tuple[Path, dict[int, str]], ray_settings: Settings,
        hf_backend_sync: Any, tmp_path: Path) -> None:
    from captionflow.ray import run_ray_file

    # Four good rows; the same settings with the caption cache on, in a store of this test.
    lines = rows_file[0].read_bytes().splitlines()[:4]
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    settings = ray_settings.model_copy(update={"cache": ray_settings.cache.model_copy(
        update={"enabled": True, "store": str(tmp_path / "cache")})})
    first = asyncio.run(run_file(path, tmp_path / "run.jsonl", cache_type="jsonl",
                                 settings=settings, backend=_Shared(hf_backend_sync)))
    assert first.captioned == 4
    report, _ = run_ray_file(path, tmp_path / "ray.jsonl", cache_type="jsonl",
                             settings=settings, resume=False)
    # Every caption came from the cache: the same keys as `captionflow run`'s (the CPU
    # stage hands over the video's validator and each clip as planned), and no engine.
    assert report.captioned == 4 and not report.engine_started
    ran, on_ray = read_rows(tmp_path / "run.jsonl"), read_rows(tmp_path / "ray.jsonl")
    for a, b in zip(ran, on_ray, strict=True):
        assert a["caption_cache"]["hit"] is False and b["caption_cache"]["hit"] is True
        assert b["caption_cache"]["key"] == a["caption_cache"]["key"]
        assert b["caption"] == a["caption"]
