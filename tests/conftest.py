"""Shared fixtures. Each capability keeps its fixtures in tests/support/*_fixtures.py; the
session-scoped ones (broker, engine, vllm serve, S3 server) are listed in
tests/support/__init__.py: reuse them."""

import importlib.util
import os

# Nothing in the suite may reach a model hub or report usage: everything is built locally.
for _name, _value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
                      ("VLLM_NO_USAGE_STATS", "1"), ("DO_NOT_TRACK", "1")):
    os.environ.setdefault(_name, _value)

pytest_plugins = [
    name for name in (
        "tests.support.broker_fixtures",
        "tests.support.video_fixtures",
        "tests.support.model_fixtures",
        "tests.support.worker_fixtures",
        "tests.support.s3_fixtures",
        "tests.support.vllm_server",
    ) if importlib.util.find_spec(name) is not None
]
