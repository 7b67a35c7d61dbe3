"""`captionflow demo` end to end, as a user runs it: a subprocess from a clean work dir."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from captionflow.samples import SCENES

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_demo_prints_a_caption_for_every_sample_video(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    # A user's environment, but for vLLM's cache: the run's (tests/conftest.py).
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VLLM_", "CAPTIONFLOW_")) and k != "TMPDIR"
           or k == "VLLM_CACHE_ROOT"}
    # The console script, as scripts/demo.sh runs it (the engine's spawned child processes
    # import its module, which is how their import-time vLLM warnings are kept quiet).
    command = Path(sys.executable).with_name("captionflow")
    proc = subprocess.run(
        [str(command), "demo", "--work-dir", str(work), "--videos", "3",
         "--max-tokens", "8"],
        capture_output=True, text=True, timeout=800, env={**env, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "RANDOM-WEIGHT" in out
    lines = out.splitlines()
    for name, _, _ in SCENES[:3]:
        [i] = [n for n, line in enumerate(lines) if line.startswith(f"{name}.mp4")]
        assert lines[i + 1].startswith("  caption: "), lines[i:i + 2]
        assert "(4 frames, 8 tokens" in lines[i]
    assert "dead letter id=demo-missing code=video_not_found" in out
    assert "captioned 3, dead-lettered 1" in out
    assert (work / "videos").is_dir() and (work / "models" / "qwen2.5-vl-tiny").is_dir()
    # Quiet by default: no warnings from vLLM, torch, Triton or transformers, here or in
    # the engine's child processes (captionflow's own dead-letter line may stay).
    noise = [line for line in (proc.stdout + proc.stderr).splitlines()
             if ("warning" in line.lower() or "Triton" in line) and "captionflow" not in line]
    assert not noise, noise
