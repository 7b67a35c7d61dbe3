"""Shared fixtures. Each capability keeps its fixtures in tests/support/*_fixtures.py."""

import importlib.util

pytest_plugins = [
    name for name in (
        "tests.support.broker_fixtures",
        "tests.support.video_fixtures",
        "tests.support.model_fixtures",
        "tests.support.worker_fixtures",
    ) if importlib.util.find_spec(name) is not None
]
