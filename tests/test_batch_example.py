"""The seed's example pipeline, imports changed only, run as a script on the CPU engine."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from captionflow.config import DEFAULT_PROMPT
from tests.support.corpus import CorpusFile
from tests.test_batch_cli import REPO, mixed_rows

EXAMPLE = REPO / "examples" / "video_caption_pipeline.py"
SEED_DOC = REPO.parent / "shared" / "seed" / "video_caption_pipeline.md"


# Logging variables that captionflow's quiet default or a test session may have set.
QUIET_ENV_NAMES = ("CAPTIONFLOW_VERBOSE", "VLLM_LOGGING_LEVEL", "VLLM_CONFIGURE_LOGGING",
                   "TRANSFORMERS_VERBOSITY", "TORCH_CPP_LOG_LEVEL", "PYTHONWARNINGS")


def assert_clean_and_quiet(run: subprocess.CompletedProcess[str]) -> None:
    """A successful run of the DataFlow API prints no error and no traceback (vLLM's
    shutdown included), and off a terminal little besides its summary line: a row that
    failed may add its own warning line."""
    text = run.stdout + run.stderr
    assert "Traceback" not in text and "ERROR" not in text, text[-4000:]
    lines = [line for line in text.splitlines() if line.strip()]
    summaries = [line for line in lines if line.startswith("VideoToCaptionGenerator: ")]
    assert len(summaries) == 1, lines
    assert len(lines) <= 1 + 3, lines


def _code_lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith(("from ", "import "))]


@pytest.mark.skipif(not SEED_DOC.is_file(), reason="the seed document is not checked out here")
def test_example_is_the_seed_example_with_only_its_imports_changed() -> None:
    doc = SEED_DOC.read_text()
    seed = re.findall(r"```python\n(.*?)```", doc.split("## 4. Pipeline Example")[1], re.S)[0]
    ours = EXAMPLE.read_text()
    assert _code_lines(ours) == _code_lines(seed)
    imports = [line for line in ours.splitlines() if line.startswith(("from ", "import "))]
    assert all(line.startswith("from captionflow.dataflow import") for line in imports)
    assert len(imports) == 3


def encode_clip(path: Path, seed: int, *, seconds: int = 10, fps: int = 10, width: int = 640,
                height: int = 360) -> Path:
    """A real H.264 clip of moving blocks (ultrafast preset: ~0.5 s each here)."""
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (height // 40 + 1, width // 40 + 1, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(seconds * fps):
            img = np.kron(np.roll(blocks, i // 3, axis=1),
                          np.ones((40, 40, 1), dtype=np.uint8))[:height, :width]
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_seed_example_as_written_captions_the_seeds_job_records_bad_rows_and_resumes(
        tmp_path: Path, tiny_model_dir_8k: Path,
        video_corpus: dict[str, CorpusFile]) -> None:
    """The seed's example as written, on this CPU machine, with only the model named (the
    script asks for the 7B checkpoint): the engine settings are filled in for the machine.
    Its rows are the seed's job (20 clips, named by absolute paths outside the working
    directory, as DataFlow writes them) and the bad rows a user's file has; a second run
    captions nothing twice and starts no engine. One script, two runs: each engine start
    costs this suite half a minute."""
    work = tmp_path / "project"
    work.mkdir()
    rows, bad = mixed_rows(work, video_corpus)
    videos = tmp_path / "media" / "clips"
    videos.mkdir(parents=True)
    clips = [encode_clip(videos / f"clip{n:02d}.mp4", seed=n) for n in range(20)]
    rows += [{"video": [str(clip)], "conversation": [{"from": "human", "value": ""}]}
             for clip in clips]
    entry = work / "dataflow" / "example" / "video_caption" / "sample_data.json"
    entry.parent.mkdir(parents=True)
    entry.write_bytes(orjson.dumps(rows))
    (work / "video_caption_pipeline.py").write_text(EXAMPLE.read_text())
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV_NAMES
           and not k.startswith(("CAPTIONFLOW_", "VLLM_RPC_BASE_PATH"))}
    env.update({"CAPTIONFLOW_SERVING__MODEL": str(tiny_model_dir_8k), "PYTHONPATH": str(REPO)})
    good = len(rows) - len(bad)

    first = subprocess.run([sys.executable, "video_caption_pipeline.py"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=800)
    assert first.returncode == 0, first.stderr[-4000:]
    assert f"captioned {good}, failed {len(bad)}" in first.stderr, first.stderr[-4000:]
    assert "no engine started" not in first.stderr
    assert_clean_and_quiet(first)
    out_path = work / "cache" / "video_caption_step1.json"
    out = orjson.loads(out_path.read_bytes())
    assert [r["video"] for r in out] == [r["video"] for r in rows]
    for i, got in enumerate(out):
        if i in bad:
            assert got["caption"] is None and got["error"]["code"] == bad[i], got
        else:
            assert isinstance(got["caption"], str) and got["caption"], got
            assert "error" not in got, got
            want = "What moves?" if i == 2 else DEFAULT_PROMPT
            assert got["conversation"][0] == {"from": "human", "value": want}

    before = out_path.read_bytes()
    second = subprocess.run([sys.executable, "video_caption_pipeline.py"], cwd=work, env=env,
                            capture_output=True, text=True, timeout=280)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"captioned 0, failed {len(bad)}" in second.stderr, second.stderr[-3000:]
    assert f"skipped {good}" in second.stderr, second.stderr[-3000:]
    assert "no engine started" in second.stderr  # nothing was left for the model
    assert_clean_and_quiet(second)
    assert out_path.read_bytes() == before


_TTY_SCRIPT = """
from captionflow.config import Settings
from captionflow.dataflow import FileStorage, LocalModelVLMServing_vllm, VideoToCaptionGenerator
from tests.test_batch_files import Echo

serving = LocalModelVLMServing_vllm.from_backend(Echo(), Settings())
storage = FileStorage(first_entry_file_name="rows.json", cache_path="cache",
                      file_name_prefix="video_caption", cache_type="json")
VideoToCaptionGenerator(vlm_serving=serving).run(storage=storage.step())
serving.cleanup()
"""


def test_api_on_a_terminal_shows_a_row_bar_and_one_summary_line(tmp_path: Path) -> None:
    """On a terminal the API draws a progress bar over the rows, then prints one summary
    line, and nothing else (the captions come from a stand-in model: the output, not the
    engine, is under test here)."""
    import pty
    import select

    from tests.support.worker_fixtures import make_video

    rows = [{"video": [str(make_video(tmp_path / f"v{n}.mp4", seed=n))],
             "conversation": [{"from": "human", "value": ""}]} for n in range(3)]
    (tmp_path / "rows.json").write_bytes(orjson.dumps(rows))
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV_NAMES}
    env.update({"PYTHONPATH": str(REPO), "COLUMNS": "120", "TERM": "xterm"})
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", _TTY_SCRIPT], cwd=tmp_path, env=env,
                            stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        try:
            chunk = os.read(leader, 65536) if ready else b""
        except OSError:  # the child closed the terminal
            chunk = b""
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=60) == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
    assert "Traceback" not in text and "ERROR" not in text, text
    lines = [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]
    bars = [line for line in lines if line.startswith("captioning")]
    assert bars and "3/3" in bars[-1], lines
    summaries = [line for line in lines if line.startswith("VideoToCaptionGenerator: ")]
    assert len(summaries) == 1 and "captioned 3, failed 0" in summaries[0], lines
    assert set(lines) <= set(bars) | set(summaries), lines
    out = orjson.loads((tmp_path / "cache" / "video_caption_step1.json").read_bytes())
    assert all(isinstance(r["caption"], str) for r in out)
