"""Which pytest-xdist worker runs which tests (a pytest plugin, listed in tests/conftest.py).

scripts/test.sh runs the suite in two xdist workers with ``--dist loadscope``, and this plugin
makes the scope a *group of modules*: a module's tests stay on one worker, in order, so a
module-scoped engine starts once; modules that share something one worker can hold only
once are one group (:data:`SHARED_GROUPS`).

The suite does not use xdist's own ``--dist loadgroup``: it groups by rewriting each test's
node id in the worker, which pytest 9.2's structured node ids ignore, so every test was
scheduled on its own, silently (pytest-xdist 3.8.0, pytest-dev/pytest-xdist#1386).
The scheduler below overrides two methods of xdist's ``LoadScopeScheduling`` (written
against pytest-xdist 3.8.0); tests/test_suite_scheduling.py runs two workers and checks that
the groups hold and the longest start first.
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


# Seconds each long group took in a run of scripts/test.sh (2 cores, two workers;
# a group's share of a session engine's start included). The longest go first, so that the
# run does not end with one worker busy on a long group while the other waits: a stale
# figure costs only balance. A group not named here goes after these, in xdist's order
# (most tests first).
SECONDS = {
    "vllm_serve": 164, "test_batch_first_run": 71, "test_fleet": 65, "test_cache_workers": 56,
    "test_worker_refusals": 55, "test_ray": 52, "fixed_ports": 49, "test_sink_faults": 44,
    "test_batch_example": 38, "test_worker_faults": 35, "test_demo": 35, "test_video_s3": 33,
    "test_qwen3_vl": 32, "test_engine_stop": 31, "test_batch_cli": 30, "test_worker": 29,
    "test_worker_bounds": 26, "test_video_hostile": 20,
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
        """xdist's scope scheduling, with :func:`group_of` as the scope and the longest
        groups (:data:`SECONDS`) first."""

        ordered = False

        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

        def _assign_work_unit(self, node: Any) -> None:
            if not self.ordered:  # the first call: the queue is whole
                for scope in sorted(self.workqueue, key=lambda s: -SECONDS.get(s, 0)):
                    self.workqueue.move_to_end(scope)
                self.ordered = True
            super()._assign_work_unit(node)

    return ModuleGroupScheduling(config, log)
