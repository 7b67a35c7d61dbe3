"""`captionflow run` as a user runs it: a subprocess with its own CPU engine over a JSONL
file mixing good rows with bad ones, then a rerun that must caption nothing twice."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from captionflow.config import DEFAULT_PROMPT, ServingSettings
from tests.support.corpus import CorpusFile
from tests.support.worker_fixtures import make_video

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def engine_env(serving: ServingSettings, work_dir: Path) -> dict[str, str]:
    """The tiny model on the CPU engine, small frames, for a child process (environment only:
    the command line and the scripts stay as a user writes them)."""
    env = dict(os.environ)
    for name in ("model", "dtype", "max_model_len", "max_num_batched_tokens", "max_num_seqs",
                 "enforce_eager", "kv_cache_memory_bytes", "temperature", "max_tokens"):
        value = getattr(serving, name)
        env[f"CAPTIONFLOW_SERVING__{name.upper()}"] = str(value).lower() \
            if isinstance(value, bool) else str(value)
    env["CAPTIONFLOW_SERVING__WORK_DIR"] = str(work_dir)
    env.update({"CAPTIONFLOW_VIDEO__FPS": "2.0", "CAPTIONFLOW_VIDEO__MAX_FRAMES": "4",
                "CAPTIONFLOW_VIDEO__MIN_FRAMES": "2",
                "CAPTIONFLOW_VIDEO__MIN_PIXELS": str(28 * 28 * 4),
                "CAPTIONFLOW_VIDEO__MAX_PIXELS": str(112 * 84), "PYTHONPATH": str(REPO)})
    return env


# Every process a `captionflow run` starts inherits its environment, this variable included.
RUN_MARK = "CAPTIONFLOW_TEST_RUN_MARK"


def processes_marked(mark: str, *, settle_s: float = 5.0) -> list[str]:
    """Processes still running with ``RUN_MARK=mark``, after up to ``settle_s`` for the
    resource tracker, which ends when it reads the end of the command's pipe."""
    import psutil

    deadline = time.monotonic() + settle_s
    while True:
        found = []
        for proc in psutil.process_iter(["name", "status"]):
            try:
                if proc.info["status"] != psutil.STATUS_ZOMBIE and \
                        proc.environ().get(RUN_MARK) == mark:
                    found.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
            except psutil.Error:
                continue
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def mixed_rows(root: Path, corpus: dict[str, CorpusFile]) -> tuple[list[dict], dict[int, str]]:
    """Rows (paths relative to ``root``) and the error code each bad row must get."""
    (root / "videos").mkdir()
    for n in (1, 2, 3):
        make_video(root / "videos" / f"good{n}.mp4", seed=100 + n)
    truncated = corpus["truncated.mp4"]
    (root / "videos" / "truncated.mp4").write_bytes(Path(truncated.path).read_bytes())
    human = [{"from": "human", "value": ""}]
    rows = [
        {"video": ["./videos/good1.mp4"], "conversation": human, "source": "a"},
        {"video": ["./videos/missing.mp4"], "conversation": human},
        {"id": "row-two", "video": ["./videos/good2.mp4"],
         "conversation": [{"from": "human", "value": "What moves?"}]},
        {"video": ["./videos/truncated.mp4"], "conversation": human},
        {"video": [], "conversation": human},
        {"video": "./videos/good3.mp4", "image": ["./frame.png"], "conversation": human},
    ]
    return rows, {1: "video_not_found", 3: str(truncated.error), 4: "schema_invalid"}


def test_cli_run_captions_good_rows_records_bad_ones_and_resumes(
        tmp_path: Path, tiny_settings: ServingSettings,
        video_corpus: dict[str, CorpusFile]) -> None:
    rows, bad = mixed_rows(tmp_path, video_corpus)
    (tmp_path / "rows.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    env = engine_env(tiny_settings, tmp_path / "vllm")
    command = [sys.executable, "-m", "captionflow", "run", "--input", "rows.jsonl",
               "--cache-path", "cache", "--file-name-prefix", "batch", "--cache-type", "jsonl"]

    mark = f"{os.getpid()}-{tmp_path.name}"
    first = subprocess.run(command, cwd=tmp_path, env={**env, RUN_MARK: mark},
                           capture_output=True, text=True, timeout=280)
    assert first.returncode == 0, first.stderr[-3000:]
    # It exits once its engine core, the CPU worker and its decoders are gone (the command
    # skips the interpreter's teardown, but only after stopping all of them).
    assert not processes_marked(mark), processes_marked(mark)
    summary = orjson.loads(first.stdout.strip().splitlines()[-1])
    out_path = tmp_path / "cache" / "batch_step1.jsonl"
    assert summary["output"] == "cache/batch_step1.jsonl"
    assert summary["captioned"] == 3 and summary["skipped"] == 0
    assert summary["failed"] == {"video_not_found": 1, "video_unreadable": 1,
                                 "schema_invalid": 1}
    assert summary["engine_started"] is True
    assert "captioned 3, failed 3" in first.stderr

    out = [orjson.loads(line) for line in out_path.read_bytes().splitlines()]
    assert len(out) == len(rows)
    for i, (row, got) in enumerate(zip(rows, out, strict=True)):
        # Every input field is kept, in order; only conversation/caption/error change, and
        # a caption brings its own caption_* fields (docs/captions.md).
        assert list(got)[:len(row)] == list(row)
        assert {k: v for k, v in got.items() if k not in ("conversation", "caption", "error")
                and not k.startswith("caption_")
                } == {k: v for k, v in row.items() if k != "conversation"}
        if i in bad:
            assert got["caption"] is None
            assert got["error"]["code"] == bad[i], got
            assert got["error"]["message"]
        else:
            assert isinstance(got["caption"], str) and got["caption"], got
            assert got["caption_status"] in ("ok", "truncated", "repetitive"), got
            assert got["caption_generations"] >= 1
            assert "error" not in got
            want = "What moves?" if i == 2 else DEFAULT_PROMPT
            assert got["conversation"][0] == {"from": "human", "value": want}

    # The rerun keeps every caption byte for byte, tries the bad rows again, and never
    # starts an engine because nothing reaches the model.
    before = out_path.read_bytes()
    second = subprocess.run(command + ["--fail-on-error"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=280)
    assert second.returncode == 1, second.stderr[-3000:]  # --fail-on-error, 3 rows failed
    again = orjson.loads(second.stdout.strip().splitlines()[-1])
    assert again["captioned"] == 0 and again["skipped"] == 3
    assert again["failed"] == summary["failed"]
    assert again["engine_started"] is False
    assert out_path.read_bytes() == before
