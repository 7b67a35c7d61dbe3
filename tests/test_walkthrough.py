"""The README's "Caption your own videos in five minutes", run as written: its commands,
taken verbatim from README.md, each in its own process group, in one folder, with no
CAPTIONFLOW_* variable set, on the CPU path (tiny model). Every published video must come
back as a caption event."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest

from captionflow.broker import port_free

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Caption your own videos in five minutes"
GPU_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"

# Fixed ports (9092, 9400): tests/support/scheduling.py runs this module on the same xdist
# worker as every other user of them.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def walkthrough_blocks() -> list[list[str]]:
    """The section's ```bash blocks, each a list of its command lines."""
    text = README.read_text()
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [[line.strip() for line in block.splitlines() if line.strip()
             and not line.strip().startswith("#")] for block in blocks]


def test_walkthrough_is_the_four_terminals_without_settings() -> None:
    blocks = walkthrough_blocks()
    lines = [line for block in blocks for line in block]
    assert all(line.startswith("captionflow ") for line in lines), lines
    assert not [line for line in lines if "=" in line or "CAPTIONFLOW" in line]
    assert blocks[0] == ["captionflow broker"]
    assert f"captionflow serve --model {GPU_MODEL}" in lines  # the GPU path is the headline
    assert "captionflow publish ./videos/" in lines and "captionflow subscribe" in lines


class Terminal:
    """One long-running command in its own process group, output collected by a thread."""

    def __init__(self, line: str, *, cwd: Path, env: dict[str, str], log: Path) -> None:
        self.line = line
        self.lines: list[str] = []
        self._log = log.open("w")
        self.proc = subprocess.Popen(shlex.split(line), cwd=cwd, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=self._log,
                                     start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._reader.join(timeout=10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self._log.close()


def run_once(line: str, *, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    got = subprocess.run(shlex.split(line), cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=300, start_new_session=True)
    assert got.returncode == 0, f"{line!r} exited {got.returncode}:\n{got.stderr}"
    return got


def wait_for(predicate, *, timeout_s: float, what: str, watch: list[Terminal]) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        for t in watch:
            assert t.proc.poll() is None, f"{t.line!r} exited {t.proc.returncode}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_readme_walkthrough_captions_every_published_video(tmp_path: Path) -> None:
    for host, port in (("127.0.0.1", 9092), ("0.0.0.0", 9400)):
        if not port_free(host, port):
            pytest.skip(f"the walkthrough needs port {port} (broker / worker metrics), and "
                        "something else is using it")
    broker_line, *rest = walkthrough_blocks()
    cpu_block = next(b for b in rest if any(line.startswith("captionflow serve") and
                                            GPU_MODEL not in line for line in b))
    [serve_line] = [line for line in cpu_block if line.startswith("captionflow serve")]
    [model_line] = [line for line in cpu_block if line != serve_line]
    videos_block = next(b for b in rest if any(line.startswith("captionflow publish")
                                                for line in b))
    [subscribe_line] = next(b for b in rest if b[0].startswith("captionflow subscribe"))

    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONFLOW_")}
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    logs = tmp_path / "logs"
    logs.mkdir()
    work = tmp_path / "walk"
    work.mkdir()
    terminals: list[Terminal] = []
    try:
        broker = Terminal(broker_line[0], cwd=work, env=env, log=logs / "broker.err")
        terminals.append(broker)
        wait_for(lambda: any(x.startswith("bootstrap servers:") for x in broker.lines),
                 timeout_s=60, what="the broker", watch=terminals)

        run_once(model_line, cwd=work, env=env)
        terminals.append(Terminal(serve_line, cwd=work, env=env, log=logs / "serve.err"))

        published: dict[str, str] = {}
        for line in videos_block:
            got = run_once(line, cwd=work, env=env)
            if line.startswith("captionflow publish"):
                for row in got.stdout.splitlines():
                    event = orjson.loads(row)
                    published[event["id"]] = event["video"][0]
        assert len(published) >= 1

        subscriber = Terminal(subscribe_line, cwd=work, env=env, log=logs / "subscribe.err")
        terminals.append(subscriber)
        # Not part of the walkthrough: an observer so that a dead letter fails the test at
        # once, with its reason, instead of a wait for a caption that will never come.
        dead = Terminal("captionflow subscribe --only-dead-letter", cwd=work, env=env,
                        log=logs / "dead-letter.err")
        terminals.append(dead)

        def captions() -> dict[str, dict]:
            assert not dead.lines, f"dead letters: {dead.lines}"
            return {ev["id"]: ev for ev in map(orjson.loads, list(subscriber.lines))}

        wait_for(lambda: set(published) <= set(captions()), timeout_s=300,
                 what=f"captions for {len(published)} videos", watch=terminals)
        got = captions()
        for event_id, video in published.items():
            assert got[event_id]["video"] == [video]
            assert isinstance(got[event_id]["caption"], str)
            assert got[event_id]["model"] == serve_line.split("--model ", 1)[1]
    except BaseException:
        for log in sorted(logs.iterdir()):
            print(f"--- {log.name}\n{log.read_text()[-4000:]}")
        raise
    finally:
        for t in reversed(terminals):
            t.stop()
