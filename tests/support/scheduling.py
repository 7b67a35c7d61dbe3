"""Which pytest-xdist worker runs which tests (a pytest plugin, listed in tests/conftest.py).

scripts/test.sh runs the suite in two xdist workers with ``--dist loadscope``, and this plugin
makes the scope a *group of modules*: a module's tests stay on one worker, in order, so a
module-scoped engine starts once; modules that share something one worker can hold only
once are one group (:data:`SHARED_GROUPS`).

The suite does not use xdist's own ``--dist loadgroup``: it groups by rewriting each test's
node id in the worker, which pytest 9.2's structured node ids ignore, so every test was
scheduled on its own, silently (pytest-xdist 3.8.0, pytest-dev/pytest-xdist#1386).
tests/test_suite_scheduling.py runs two workers and checks the grouping holds.
"""

from __future__ import annotations

from typing import Any

import pytest

# Modules that must run on the same worker, and why.
SHARED_GROUPS = {
    # One `vllm serve` (session fixture `vllm_server`): a second would cost ~30 s.
    "test_serving_openai_live": "vllm_serve",
    "test_worker_process": "vllm_serve",
    "test_worker_remote_outage": "vllm_serve",
    # Fixed ports 9092 and 9400 (the README walkthrough, the broker's default port).
    "test_walkthrough": "fixed_ports",
    "test_broker": "fixed_ports",
}


def group_of(nodeid: str) -> str:
    """The scheduling group of a test: its module's, or the shared group its module is in."""
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
    return SHARED_GROUPS.get(module, module)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, absent without it
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getoption("dist") != "loadscope":
        return None  # xdist's own scheduler for any other mode
    from xdist.scheduler import LoadScopeScheduling

    class ModuleGroupScheduling(LoadScopeScheduling):
        """xdist's scope scheduling, with :func:`group_of` as the scope."""

        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    return ModuleGroupScheduling(config, log)
