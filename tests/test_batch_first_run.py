"""A new user's first `captionflow run`, as a subprocess with no CAPTIONFLOW_* variables: on
this CPU machine it captions every good row of a model whose context (8192) is below the
seed's max_model_len, and says which engine settings it chose; a model that is not there or
a setting that cannot work ends the run once, exit 2, output untouched; CSV and parquet
files round-trip through it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from captionflow.batch import FileStorage, read_rows, write_rows
from captionflow.dataflow import LocalModelVLMServing_vllm, VideoToCaptionGenerator
from captionflow.errors import ConfigError
from tests.support.worker_fixtures import make_video
from tests.test_batch_cli import REPO

pytestmark = pytest.mark.slow


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user who has set nothing: no CAPTIONFLOW_* and no vLLM socket
    path (captionflow prepares it itself). vLLM's cache stays the session's (conftest.py)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CAPTIONFLOW_", "VLLM_RPC_BASE_PATH"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def user_rows(root: Path) -> list[dict]:
    """Rows as a user writes them: a relative path, an absolute path outside the working
    directory, and one missing file."""
    (root / "videos").mkdir()
    outside = root.parent / f"{root.name}-elsewhere"
    outside.mkdir()
    make_video(root / "videos" / "a.mp4", seed=21)
    make_video(outside / "b.mp4", seed=22)
    human = [{"from": "human", "value": ""}]
    return [
        {"video": ["./videos/a.mp4"], "conversation": human},
        {"video": [str(outside / "b.mp4")], "conversation": human, "meta": {"n": 1}},
        {"video": ["./videos/missing.mp4"], "conversation": human},
    ]


def run_cli(args: list[str], cwd: Path, env: dict[str, str],
            timeout: float = 500) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "captionflow", "run", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(600)
def test_first_run_with_no_settings_captions_every_good_row(
        tmp_path: Path, tiny_model_dir_8k: Path) -> None:
    rows = user_rows(tmp_path)
    (tmp_path / "rows.json").write_bytes(orjson.dumps(rows))
    done = run_cli(["--input", "rows.json", "--model", str(tiny_model_dir_8k)], tmp_path,
                   clean_env())
    assert done.returncode == 0, done.stderr[-4000:]
    summary = orjson.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["captioned"], summary["failed"]) == (2, {"video_not_found": 1})
    out = read_rows(tmp_path / "cache" / "dataflow_cache_step_step1.json")
    assert all(isinstance(r["caption"], str) and "error" not in r for r in out[:2]), out
    assert out[2]["error"]["code"] == "video_not_found"
    settings_line = next(line for line in done.stderr.splitlines()
                         if "vLLM engine settings" in line)
    for chosen in ("max_model_len=8192", "dtype=float32", "enforce_eager=True",
                   "kv_cache_memory_bytes=", "max_num_batched_tokens=8192"):
        assert chosen in settings_line, settings_line


@pytest.mark.parametrize("how, message", [
    ("missing model", "is not a model directory"),
    ("impossible setting", "cannot hold one sequence"),
])
def test_settings_that_cannot_work_exit_2_once_and_leave_the_output(
        tmp_path: Path, tiny_model_dir_8k: Path, how: str, message: str) -> None:
    rows = user_rows(tmp_path)
    (tmp_path / "rows.json").write_bytes(orjson.dumps(rows))
    earlier = b'[{"video": ["./videos/a.mp4"], "caption": "from an earlier run"}]\n'
    (tmp_path / "out.json").write_bytes(earlier)
    if how == "missing model":
        model, env = str(tmp_path / "no-such-model"), clean_env()
    else:
        model, env = str(tiny_model_dir_8k), clean_env(
            CAPTIONFLOW_SERVING__KV_CACHE_MEMORY_BYTES="4096")
    for output in ("out.json", "new.json"):
        done = run_cli(["--input", "rows.json", "--model", model, "--output", output,
                        "--no-resume"], tmp_path, env, timeout=200)
        assert done.returncode == 2, done.stderr[-3000:]
        said = " ".join(done.stderr.split())  # rich wraps long lines
        assert said.count("error:") == 1 and message in said, done.stderr
        assert "config_invalid" in done.stderr and done.stdout == ""
    assert (tmp_path / "out.json").read_bytes() == earlier
    assert not (tmp_path / "new.json").exists()


@pytest.mark.parametrize("how, message", [
    ("missing model", "is not a model directory"),
    ("impossible setting", "cannot hold one sequence"),
])
def test_the_python_api_raises_the_same_errors_once(
        tmp_path: Path, tiny_model_dir_8k: Path, serving_work_dir: Path,
        monkeypatch: pytest.MonkeyPatch, how: str, message: str) -> None:
    for key in [k for k in os.environ if k.startswith("CAPTIONFLOW_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows.json").write_bytes(orjson.dumps(user_rows(tmp_path)))
    if how == "missing model":
        serving = LocalModelVLMServing_vllm(hf_model_name_or_path=str(tmp_path / "nope"))
    else:
        serving = LocalModelVLMServing_vllm(hf_model_name_or_path=str(tiny_model_dir_8k),
                                            kv_cache_memory_bytes=4096)
    storage = FileStorage("rows.json", cache_path="cache", file_name_prefix="cap")
    try:
        with pytest.raises(ConfigError, match=message):
            VideoToCaptionGenerator(vlm_serving=serving).run(storage.step())
    finally:
        serving.cleanup()
    assert not (tmp_path / "cache").exists()


@pytest.mark.timeout(400)
@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_csv_and_parquet_round_trip_through_captionflow_run(
        tmp_path: Path, tiny_model_dir_8k: Path, kind: str) -> None:
    """The transformers backend runs the tiny model here: what is checked is the file
    handling of `captionflow run`, the same for every backend, without a second engine."""
    rows = user_rows(tmp_path)
    rows[0]["id"] = "0042"      # a string that reads as a number
    rows[1]["video"] = rows[1]["video"][0]  # a plain string beside lists
    write_rows(tmp_path / f"rows.{kind}", rows, kind)  # type: ignore[arg-type]
    done = run_cli(["--input", f"rows.{kind}", "--cache-type", kind, "--backend",
                    "transformers", "--model", str(tiny_model_dir_8k)], tmp_path,
                   clean_env(CAPTIONFLOW_SERVING__MAX_TOKENS="8"), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = read_rows(tmp_path / "cache" / f"dataflow_cache_step_step1.{kind}")
    assert len(out) == 3
    for row, got in zip(rows, out, strict=True):
        assert {k: got[k] for k in row if k != "conversation"} == \
            {k: v for k, v in row.items() if k != "conversation"}
    assert isinstance(out[0]["caption"], str) and isinstance(out[1]["caption"], str)
    assert out[0]["conversation"][0]["value"] == "Please describe the video in detail."
    assert out[2]["caption"] is None and out[2]["error"]["code"] == "video_not_found"
    assert "error" not in out[0]
