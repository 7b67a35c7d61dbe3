"""The shipped dashboard and alert rules against a real Prometheus server scraping a real
worker under traffic (embedded broker, tiny model on the vLLM CPU engine).

Every PromQL expression of the dashboard must return data, so no panel shows "No data"
because it queries a series the worker does not export; every alert expression must
watch real series (its comparisons turned into ``bool`` so a quiet alert still returns
its series); Prometheus must load and evaluate the shipped rule file without errors.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "captionflow.json"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

SCRAPE_INTERVAL = "1s"
# Grafana's variables, as a query for "All workers, recent window" needs them. Windows are
# short so that 1 s scrapes fill them within seconds; rate() needs two samples.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m", "${__rate_interval}": "1m", "$__interval": "5s",
    "$__range": "1m", "${instance}": ".*", "[[instance]]": ".*", "$instance": ".*",
}
DATA_DEADLINE_S = 90.0

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def substitute(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable left in {expr!r}: add it to the test"
    return expr


def dashboard_queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    panels = []
    for panel in board["panels"]:
        panels += panel.get("panels", []) if panel["type"] == "row" else [panel]
    queries = [(f"{p['title']} [{t['refId']}]", substitute(t["expr"]))
               for p in panels for t in p["targets"]]
    # The worker selector: label_values(METRIC, instance) needs METRIC's series.
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["definition"])
            assert m, f"variable {var['name']}: unsupported query {var['definition']!r}"
            queries.append((f"variable ${var['name']}", substitute(m.group(1))))
    return queries


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [r for g in groups for r in g["rules"]]


def as_bool_comparisons(expr: str) -> str:
    """``a > 5 and b == 0`` -> ``a > bool 5 and b == bool 0``: the same series, returned
    whether or not the alert would fire. Label matchers inside {} are left alone."""
    out, depth, i = [], 0, 0
    ops = re.compile(r"(==|!=|>=|<=|>|<)(?!\s*bool\b)")
    while i < len(expr):
        ch = expr[i]
        if ch == '"':
            j = expr.index('"', i + 1)
            out.append(expr[i:j + 1])
            i = j + 1
            continue
        if ch in "{}":
            depth += 1 if ch == "{" else -1
            out.append(ch)
            i += 1
            continue
        m = ops.match(expr, i) if depth == 0 else None
        if m:
            out.append(m.group(1) + " bool")
            i = m.end()
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def test_bool_rewrite_leaves_matchers_alone():
    expr = 'sum(rate(x{stage!="a",code=~"b"}[5m])) > 0.05 and y == 0'
    assert as_bool_comparisons(expr) == (
        'sum(rate(x{stage!="a",code=~"b"}[5m])) > bool 0.05 and y == bool 0')


@pytest.fixture
def prometheus(live_worker, tmp_path: Path) -> Iterator[str]:
    """A Prometheus 2.x server on loopback scraping the live worker every second with the
    shipped job and rule file; yields its base URL."""
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.skip("prometheus not installed (apt-get install prometheus; scripts/setup.sh)")
    shipped = yaml.safe_load(PROMETHEUS_YML.read_text())
    # The worker's job (the file also scrapes captionflow sink).
    [job] = [j for j in shipped["scrape_configs"] if j["job_name"] == "captionflow"]
    config = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{
            "job_name": job["job_name"], "metrics_path": job.get("metrics_path", "/metrics"),
            "static_configs": [{"targets": [live_worker.target]}],
        }],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [exe, f"--config.file={config_path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if proc.returncode not in (0, -15):
            print((tmp_path / "prometheus.log").read_text())


async def query(client: httpx.AsyncClient, expr: str) -> list[dict[str, Any]]:
    r = await client.get("/api/v1/query", params={"query": expr})
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (
        f"Prometheus rejected {expr!r}: {body.get('error', r.text)}")
    return body["data"]["result"]


async def wait_ready(client: httpx.AsyncClient, deadline: float) -> None:
    while True:
        try:
            if (await client.get("/-/ready")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "Prometheus did not become ready"
        await asyncio.sleep(0.2)


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="session")
async def test_dashboard_and_alert_queries_return_data(live_worker, prometheus):
    deadline = time.monotonic() + DATA_DEADLINE_S
    async with httpx.AsyncClient(base_url=prometheus, timeout=30) as client:
        await wait_ready(client, deadline)

        # The scrape itself: the shipped job reaches the worker's /metrics.
        while not [s for s in await query(client, 'up{job="captionflow"} == 1')]:
            assert time.monotonic() < deadline, (
                f"Prometheus never scraped {live_worker.metrics_url} successfully "
                "(see the target's lastError at /api/v1/targets)")
            await asyncio.sleep(0.5)

        dashboard = dashboard_queries()
        alerts = [(f"alert {r['alert']}", as_bool_comparisons(r["expr"]))
                  for r in alert_rules() if "alert" in r]
        for rule in alert_rules():
            await query(client, rule["expr"])  # each shipped expression, unmodified, is valid

        # Counters need two samples in the window: poll until everything has data.
        pending = dashboard + alerts
        while True:
            empty = [(name, expr) for name, expr in pending if not await query(client, expr)]
            if not empty or time.monotonic() > deadline:
                break
            pending = empty
            await asyncio.sleep(1.0)
        assert not empty, "queries with no data after {:.0f} s of 1 s scrapes:\n{}".format(
            DATA_DEADLINE_S, "\n".join(f"  {name}: {expr}" for name, expr in empty))

        [info] = await query(client, "captionflow_worker_info")
        assert info["metric"]["instance"] == live_worker.target
        assert info["metric"]["job"] == "captionflow"

        # A healthy worker under traffic: ready, both dependencies up (as Prometheus sees it).
        up = {r["metric"]["dependency"]: r["value"][1]
              for r in await query(client, "captionflow_dependency_up")}
        assert up == {"broker": "1", "engine": "1"}
        assert [r["value"][1] for r in await query(client, "captionflow_ready")] == ["1"]

        # Prometheus loaded the shipped rule file and evaluates every rule without error.
        while True:
            rules = (await client.get("/api/v1/rules")).json()["data"]["groups"]
            health = {r["name"]: (r["health"], r.get("lastError", ""))
                      for g in rules for r in g["rules"]}
            if all(h == "ok" for h, _ in health.values()) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert set(health) == {r["alert"] for r in alert_rules()}
        assert all(h == "ok" for h, _ in health.values()), health
