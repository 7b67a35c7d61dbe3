"""Several real ``captionflow serve`` processes in one consumer group, for the fleet tests
and ``bench/bench_fleet.py``: spawn, signal, and read back what the group produced."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson

from captionflow.config import KafkaSettings, Settings
from captionflow.schemas import decode_caption_event
from tests.support.kafka_helpers import read_topic


def write_config(settings: Settings, path: Path) -> Path:
    path.write_bytes(orjson.dumps(settings.model_dump(mode="json")))
    return path


def spawn_worker(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """A worker process in its own process group (its decoder processes die with it when
    the group is killed, as in a killed pod)."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "captionflow", "serve", "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the worker and everything it started: no handler runs."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def worker_pid(caption_worker: str | None) -> int | None:
    """The process id at the end of a caption event's ``worker`` field."""
    tail = (caption_worker or "").rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


async def captions(kafka: KafkaSettings, topic: str, *, at_least: int, timeout_s: float,
                   procs: list[subprocess.Popen[bytes]] | None = None, log: Path | None = None,
                   ) -> collections.Counter[str]:
    """Caption event ids on ``topic`` with multiplicity, once at least ``at_least`` records
    are there; fails early if every process in ``procs`` has exited."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = await read_topic(kafka, topic, expected=at_least, timeout_s=3, settle_s=0.2)
        if len(records) >= at_least:
            return collections.Counter(decode_caption_event(r.value).id for r in records)
        tail = log.read_text(errors="replace")[-3000:] if log else ""
        if procs and all(p.poll() is not None for p in procs):
            raise AssertionError(f"every worker exited:\n{tail}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(records)} of {at_least} captions after "
                                 f"{timeout_s:.0f} s:\n{tail}")
