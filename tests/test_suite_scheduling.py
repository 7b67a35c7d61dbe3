"""The suite's own xdist scheduling (tests/support/scheduling.py), run as scripts/test.sh runs
it: two workers, ``--dist loadscope``, over a scratch tree of modules."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

from tests.support.scheduling import SECONDS, SHARED_GROUPS, group_of

REPO = Path(__file__).resolve().parents[1]

MODULE = """
import os, time
from pathlib import Path

def test_{n}(tmp_path_factory):
    time.sleep(0.2)
    with open(os.environ["WHERE"], "a") as out:
        out.write(f"{{__name__}} {{os.environ['PYTEST_XDIST_WORKER']}}\\n")
"""


def test_group_of_names_the_module_or_its_shared_group() -> None:
    assert group_of("tests/test_demo.py::test_x[a::b@c]") == "test_demo"
    assert group_of("tests/test_walkthrough.py::test_y") == "fixed_ports"
    assert group_of("tests/test_broker.py::test_z") == group_of("tests/test_walkthrough.py::t")
    assert set(SHARED_GROUPS.values()) == {"vllm_serve", "fixed_ports"}


def test_two_workers_keep_each_group_on_one_worker(tmp_path: Path) -> None:
    modules = ["test_walkthrough", "test_broker", "test_alpha", "test_beta", "test_gamma",
               "test_worker_process", "test_serving_openai_live"]
    counts = {}  # xdist's own order would run the groups with the most tests first
    for module in modules:
        counts[module] = 1 if module in SHARED_GROUPS else 4
        (tmp_path / f"{module}.py").write_text(
            "".join(MODULE.format(n=n) for n in range(counts[module])))
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["tests.support.scheduling"]\n')
    where = tmp_path / "where.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "WHERE": str(where)}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadscope", "-p",
         "no:cacheprovider", "-q", "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    workers, first = collections.defaultdict(set), {}
    for line in where.read_text().splitlines():  # in the order the tests ran
        module, worker = line.split()
        workers[group_of(module + ".py")].add(worker)
        first.setdefault(worker, group_of(module + ".py"))
    assert sum(1 for _ in where.read_text().splitlines()) == sum(counts.values())
    assert all(len(ws) == 1 for ws in workers.values()), dict(workers)
    assert len(set().union(*workers.values())) == 2, dict(workers)  # both workers were used
    # The two longest groups (SECONDS) start first, one on each worker.
    assert set(first.values()) == {"vllm_serve", "fixed_ports"}, first


def test_every_timed_group_exists() -> None:
    """A renamed module would silently lose its place at the front of the run."""
    groups = {group_of(path.name) for path in (REPO / "tests").glob("test_*.py")}
    assert set(SECONDS) <= groups, set(SECONDS) - groups
