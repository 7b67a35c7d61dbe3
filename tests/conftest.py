"""Shared fixtures. Each capability keeps its fixtures in tests/support/*_fixtures.py; the
session-scoped ones (broker, engine, vllm serve, S3 server) are listed in
tests/support/__init__.py: reuse them."""

import atexit
import importlib.util
import os
import shutil
import tempfile

import pytest

# Nothing in the suite may reach a model hub or report usage: everything is built locally.
for _name, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
                      ("VLLM_NO_USAGE_STATS", "1"), ("DO_NOT_TRACK", "1")):
    os.environ.setdefault(_name, _value)
# The caption cache (on by default, under ~/.cache) would carry captions from one test or
# session to the next: tests that use it turn it on with their own store. Subprocesses that
# run as a user who set nothing (no CAPTIONFLOW_*) get this session's own cache directory.
os.environ.setdefault("CAPTIONFLOW_CACHE__ENABLED", "false")
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="captionflow-test-xdg-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)
# vLLM's own cache is the run's, shared by every engine its test processes and their
# subprocesses start (tests that run as a user who set nothing keep it too), as a user's
# ~/.cache/vllm is: a cold one costs each engine start ~11 s of model inspection. The
# pytest-xdist controller makes it before it starts the workers, which inherit it, and
# removes it after they are gone.
if "VLLM_CACHE_ROOT" not in os.environ:
    os.environ["VLLM_CACHE_ROOT"] = tempfile.mkdtemp(prefix="captionflow-test-vllm-cache-")
    atexit.register(shutil.rmtree, os.environ["VLLM_CACHE_ROOT"], ignore_errors=True)

pytest_plugins = [
    name for name in (
        "tests.support.broker_fixtures",
        "tests.support.video_fixtures",
        "tests.support.model_fixtures",
        "tests.support.worker_fixtures",
        "tests.support.s3_fixtures",
        "tests.support.vllm_server",
        "tests.support.scheduling",
    ) if importlib.util.find_spec(name) is not None
]


@pytest.fixture(autouse=True)
def _own_xdg_cache(tmp_path_factory: pytest.TempPathFactory,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's subprocesses find an empty default caption cache, as a first run does."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
