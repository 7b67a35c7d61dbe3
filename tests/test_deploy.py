"""Static checks of everything under deploy/: the files parse, name only real settings and
metrics, agree with the worker on port, paths and shutdown grace, and pass promtool.

The compose file, Dockerfile and Kubernetes manifests cannot run here (no Docker engine,
no cluster), so these tests hold them to what the code defines.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from captionflow.config import ENV_PREFIX, MetricsSettings, Settings, WorkerSettings, setting_names
from captionflow.metrics import STAGES, Metrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose" / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S = DEPLOY / "k8s"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "captionflow.json"
GRAFANA_PROVISIONING = DEPLOY / "grafana" / "provisioning"

METRICS_PATH = "/metrics"
HEALTH_PATHS = {"/healthz", "/readyz"}
JOB = "captionflow"
# Read by the settings loader itself, not a field of the settings model.
NON_FIELD_ENV = {f"{ENV_PREFIX}CONFIG"}


# --- loaders -------------------------------------------------------------------------------

def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def k8s_docs() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def k8s_kind(kind: str) -> dict:
    found = [d for d in k8s_docs() if d.get("kind") == kind]
    assert len(found) == 1, f"deploy/k8s must hold exactly one {kind}, found {len(found)}"
    return found[0]


def compose_services() -> dict[str, dict]:
    return load_yaml(COMPOSE)["services"]


def env_dict(env: Any) -> dict[str, str]:
    """Compose `environment` as a mapping or a list of NAME=value."""
    if env is None:
        return {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def dockerfile_env() -> dict[str, str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip().upper().startswith("ENV "):
            for name, value in re.findall(r"(\w+)=(\S+)", line):
                env[name] = value
    return env


def configmap_env() -> dict[str, str]:
    return {k: str(v) for k, v in k8s_kind("ConfigMap")["data"].items()}


WORKLOAD = "StatefulSet"  # stable pod names are the workers' static member ids


def deployment_container() -> dict:
    containers = k8s_kind(WORKLOAD)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "the worker pod runs one container"
    return containers[0]


def env_to_setting(name: str) -> str:
    """CAPTIONFLOW_WORKER__MAX_BATCH_SIZE -> worker.max_batch_size"""
    assert name.startswith(ENV_PREFIX), name
    return name[len(ENV_PREFIX):].lower().replace("__", ".")


def settings_from_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Settings:
    """The settings a worker would build from these variables (and nothing else)."""
    import os

    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith(ENV_PREFIX):
            monkeypatch.setenv(name, value)
    return Settings.load()


def duration_s(value: str) -> float:
    """Compose durations: 40s, 1m30s, 500ms."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"bad duration {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


# --- metric names --------------------------------------------------------------------------

def exported_captionflow_series() -> dict[str, set[str]]:
    """Every series name a fresh Metrics registry can expose, with its label names."""
    names: dict[str, set[str]] = {}
    metrics = Metrics.fresh()
    for collector in metrics.registry._collector_to_names:
        labels = set(getattr(collector, "_labelnames", ()))
        for family in collector.describe():
            base = family.name
            suffixes = {"counter": ["_total", "_created"],
                        "histogram": ["_bucket", "_sum", "_count", "_created"],
                        "gauge": [""]}[family.type]
            for suffix in suffixes:
                names[base + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict]:
    out = []
    for panel in dashboard()["panels"]:
        if panel["type"] == "row":
            out += panel.get("panels", [])
        else:
            out.append(panel)
    return out


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p["targets"]]


def rule_exprs() -> list[str]:
    return [r["expr"] for g in load_yaml(PROM / "alerts.yml")["groups"] for r in g["rules"]]


SELECTOR = re.compile(r"\b(captionflow_[a-z0-9_]+)(\{[^}]*\})?")
LABEL_MATCH = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
BY_CLAUSE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def test_dashboard_and_rules_reference_only_exported_metrics_and_labels():
    exported = exported_captionflow_series()
    assert "captionflow_stage_duration_seconds_bucket" in exported  # the parser itself works
    problems = []
    for expr in dashboard_exprs() + rule_exprs():
        for name, selector in SELECTOR.findall(expr):
            if name not in exported:
                problems.append(f"{name} (in {expr!r}) is not in captionflow/metrics.py")
                continue
            for label, _op, value in LABEL_MATCH.findall(selector or ""):
                if label not in exported[name] | {"instance", "job"}:
                    problems.append(f"{name} has no label {label!r} (in {expr!r})")
                if name.startswith("captionflow_stage_duration") and label == "stage":
                    if value not in STAGES:
                        problems.append(f"stage {value!r} is not one of {STAGES}")
    assert not problems, "\n".join(problems)


def test_grouping_labels_exist_on_the_metrics_they_group():
    exported = exported_captionflow_series()
    problems = []
    for expr in dashboard_exprs() + rule_exprs():
        names = [n for n, _ in SELECTOR.findall(expr)]
        if not names:
            continue
        available = set.union(*(exported[n] for n in names if n in exported)) | {
            "instance", "job"}
        for clause in BY_CLAUSE.findall(expr):
            for label in filter(None, (s.strip() for s in clause.split(","))):
                if label not in available:
                    problems.append(f"grouping label {label!r} not on {names} in {expr!r}")
    assert not problems, "\n".join(problems)


def vllm_registered_metric_names() -> set[str] | None:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    loggers = Path(next(iter(spec.submodule_search_locations))) / "v1" / "metrics" / "loggers.py"
    if not loggers.is_file():
        return None
    return set(re.findall(r'name="(vllm:[a-z0-9_]+)"', loggers.read_text()))


def test_dashboard_vllm_metrics_are_registered_by_the_installed_vllm():
    registered = vllm_registered_metric_names()
    if registered is None:
        pytest.skip("vLLM is not installed: cannot read its metric names (scripts/setup.sh)")
    used = set()
    for expr in dashboard_exprs() + rule_exprs():
        used |= set(re.findall(r"vllm:[a-z0-9_]+", expr))
    assert used, "the dashboard shows vLLM's running/waiting requests and KV-cache usage"
    # prometheus_client adds _total to counters at exposition.
    missing = {u for u in used if u not in registered and u.removesuffix("_total") not in registered}
    assert not missing, f"vLLM does not register {sorted(missing)} (vllm/v1/metrics/loggers.py)"
    assert {"vllm:num_requests_running", "vllm:num_requests_waiting",
            "vllm:kv_cache_usage_perc"} <= used


# --- dashboard and Grafana provisioning -----------------------------------------------------

def test_dashboard_panels_query_through_the_instance_variable():
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    instance = variables["instance"]
    assert instance["includeAll"] and instance["allValue"] == ".*"
    assert "captionflow_worker_info" in json.dumps(instance["query"])
    panels = dashboard_panels()
    ids = [p["id"] for p in board["panels"]] + [p["id"] for p in panels if p not in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            assert 'instance=~"$instance"' in target["expr"], (
                f"panel {panel['title']!r}: add instance=~\"$instance\" to {target['expr']!r} "
                "so the worker selector applies")


def test_dashboard_answers_the_operator_questions():
    exprs = "\n".join(dashboard_exprs())
    for needle in [
        "captionflow_events_consumed_total", "captionflow_events_captioned_total",
        "sum by (code) (rate(captionflow_events_dead_lettered_total",
        'stage="end_to_end"', "sum by (stage, le) (rate(captionflow_stage_duration_seconds_bucket",
        "max by (topic, partition) (captionflow_consumer_lag_records",
        "captionflow_in_flight_events", "captionflow_paused_partitions",
        "captionflow_batch_size_events_bucket", "captionflow_tokens_total",
        "captionflow_frames_decoded_total", "captionflow_ready",
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    ]:
        assert needle in exprs, f"the dashboard has no panel querying {needle}"


def test_grafana_provisioning_matches_compose_mounts():
    provider = load_yaml(GRAFANA_PROVISIONING / "dashboards" / "captionflow.yml")
    path = provider["providers"][0]["options"]["path"]
    datasource = load_yaml(GRAFANA_PROVISIONING / "datasources" / "prometheus.yml")
    ds = datasource["datasources"][0]
    assert ds["type"] == "prometheus"
    services = compose_services()
    mounts = {m.split(":")[1]: (COMPOSE.parent / m.split(":")[0]).resolve()
              for m in services["grafana"]["volumes"] if m.startswith(".")}
    assert mounts[path] == DASHBOARD.parent, f"mount deploy/grafana/dashboards at {path}"
    assert mounts["/etc/grafana/provisioning"] == GRAFANA_PROVISIONING
    assert ds["url"] == "http://prometheus:9090" and "prometheus" in services


# --- settings named in deploy files ---------------------------------------------------------

def all_deploy_env_names() -> dict[str, set[str]]:
    where: dict[str, set[str]] = {}
    for service, spec in compose_services().items():
        for name in env_dict(spec.get("environment")):
            where.setdefault(name, set()).add(f"compose service {service}")
    for name in dockerfile_env():
        where.setdefault(name, set()).add("deploy/Dockerfile")
    for name in configmap_env():
        where.setdefault(name, set()).add("k8s ConfigMap")
    for item in deployment_container().get("env", []):
        where.setdefault(item["name"], set()).add(f"k8s {WORKLOAD}")
    return where


def test_every_captionflow_env_var_maps_to_a_real_setting():
    names = setting_names()
    assert "worker.max_batch_size" in names  # the mapping below is checked against these
    assert env_to_setting("CAPTIONFLOW_KAFKA__BOOTSTRAP_SERVERS") == "kafka.bootstrap_servers"
    used = {n: w for n, w in all_deploy_env_names().items() if n.startswith(ENV_PREFIX)}
    assert len(used) > 10
    unknown = [f"{n} ({', '.join(sorted(w))}) -> {env_to_setting(n)}"
               for n, w in sorted(used.items())
               if n not in NON_FIELD_ENV and env_to_setting(n) not in names]
    assert not unknown, "not settings (see captionflow/config.py):\n" + "\n".join(unknown)


def test_compose_and_configmap_values_are_valid_settings(monkeypatch):
    for label, env in [("compose worker", env_dict(compose_services()["worker"]["environment"])),
                       ("k8s ConfigMap", configmap_env()),
                       ("Dockerfile", dockerfile_env())]:
        settings = settings_from_env(monkeypatch, env)  # raises ConfigError naming the value
        assert settings.metrics.port == MetricsSettings().port, label


# --- port, paths, grace ---------------------------------------------------------------------

def test_compose_worker_uses_the_worker_port_paths_and_grace(monkeypatch):
    port = MetricsSettings().port
    worker = compose_services()["worker"]
    settings = settings_from_env(monkeypatch, env_dict(worker["environment"]))
    assert settings.metrics.port == port
    assert any(str(p).split(":")[-1] == str(port) for p in worker["ports"])
    check = " ".join(worker["healthcheck"]["test"])
    urls = re.findall(r"http://[\w.]+:(\d+)(/\w+)", check)
    assert urls and all(int(p) == port and path in HEALTH_PATHS for p, path in urls), check
    grace = duration_s(worker["stop_grace_period"])
    assert grace > settings.worker.shutdown_grace_s, (
        f"stop_grace_period {grace}s must exceed worker.shutdown_grace_s "
        f"{settings.worker.shutdown_grace_s}s or docker kills the worker mid-drain")
    assert f"EXPOSE {port}" in DOCKERFILE.read_text()


def test_prometheus_scrapes_the_worker_metrics_endpoint():
    config = load_yaml(PROM / "prometheus.yml")
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    job = jobs[JOB]
    assert job.get("metrics_path", "/metrics") == METRICS_PATH
    ports = [sd["port"] for sd in job.get("dns_sd_configs", [])]
    ports += [int(t.rsplit(":", 1)[1]) for sc in job.get("static_configs", [])
              for t in sc["targets"]]
    assert ports and set(ports) == {MetricsSettings().port}
    sd_names = {n for sd in job.get("dns_sd_configs", []) for n in sd["names"]}
    assert sd_names <= set(compose_services()), "scrape targets must be compose services"


def test_k8s_worker_probes_port_and_grace(monkeypatch):
    port = MetricsSettings().port
    pod = k8s_kind(WORKLOAD)["spec"]["template"]["spec"]
    container = deployment_container()
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named.get("metrics") == port

    def resolve(p: int | str) -> int:
        return named[p] if isinstance(p, str) else p

    probes = {k: container[k]["httpGet"] for k in ("livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    if "startupProbe" in container:
        probes["startupProbe"] = container["startupProbe"]["httpGet"]
    for kind, probe in probes.items():
        assert resolve(probe["port"]) == port, f"{kind} must target the metrics port {port}"
        assert probe["path"] in HEALTH_PATHS

    settings = settings_from_env(monkeypatch, configmap_env())
    assert container["envFrom"][0]["configMapRef"]["name"] == k8s_kind(
        "ConfigMap")["metadata"]["name"]
    grace = pod["terminationGracePeriodSeconds"]
    for shutdown in (settings.worker.shutdown_grace_s, WorkerSettings().shutdown_grace_s):
        assert grace > shutdown, (
            f"terminationGracePeriodSeconds {grace} must exceed worker.shutdown_grace_s "
            f"{shutdown}, or Kubernetes kills workers before they commit")

    gpu = container["resources"]["limits"].get("nvidia.com/gpu")
    assert gpu and int(gpu) >= settings.serving.tensor_parallel_size

    service = k8s_kind("Service")
    assert [(p["port"], resolve(p["targetPort"])) for p in service["spec"]["ports"]] == [
        (port, port)]
    labels = k8s_kind(WORKLOAD)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_k8s_podmonitor_scrapes_metrics_with_the_dashboard_job_name():
    monitor = k8s_kind("PodMonitor")
    labels = k8s_kind(WORKLOAD)["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    ports = {p["name"] for p in deployment_container()["ports"]}
    for ep in endpoints:
        assert ep["port"] in ports and ep.get("path", "/metrics") == METRICS_PATH
    assert labels[monitor["spec"]["jobLabel"]] == JOB, (
        f"the job label must be {JOB!r}: dashboards and alerts select job=\"{JOB}\"")


def test_alerts_and_dashboard_select_the_shipped_job_name():
    for expr in dashboard_exprs() + rule_exprs():
        for job in re.findall(r'job\s*=~?\s*"([^"]*)"', expr):
            assert job == JOB, expr


def test_prometheusrule_carries_the_same_rules_as_prometheus():
    rule = k8s_kind("PrometheusRule")
    assert rule["spec"]["groups"] == load_yaml(PROM / "alerts.yml")["groups"], (
        "deploy/k8s/prometheusrule.yaml drifted from deploy/prometheus/alerts.yml: copy the "
        "groups over")


def shipped_sizing(monkeypatch):
    """The worker sizing the shipped ConfigMap gives on an engine of its max_num_seqs."""
    from captionflow.consumer.sizing import size_worker
    from captionflow.serving.base import EngineCapacity

    settings = settings_from_env(monkeypatch, configmap_env())
    seqs = settings.serving.max_num_seqs
    assert seqs, "the ConfigMap sets CAPTIONFLOW_SERVING__MAX_NUM_SEQS"
    return settings, size_worker(settings.worker, settings.video, EngineCapacity(seqs, "cm"))


def test_keda_scales_on_lag_and_engine_queue_within_the_partition_count(monkeypatch):
    scaled = k8s_kind("ScaledObject")
    settings, sizing = shipped_sizing(monkeypatch)
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    workload = k8s_kind(WORKLOAD)
    assert (target.get("kind"), target["name"]) == (WORKLOAD, workload["metadata"]["name"])
    assert 1 <= spec.get("minReplicaCount", 0) <= spec["maxReplicaCount"]
    assert spec["maxReplicaCount"] <= settings.topics.partitions, (
        f"maxReplicaCount {spec['maxReplicaCount']} exceeds topics.partitions "
        f"{settings.topics.partitions}: extra workers would get no partition")
    triggers = {t["type"]: t["metadata"] for t in spec["triggers"]}
    assert set(triggers) == {"kafka", "prometheus"}
    meta = triggers["kafka"]
    assert meta["topic"] == settings.topics.input
    assert meta["consumerGroup"] == settings.worker.group_id
    assert meta["bootstrapServers"] == settings.kafka.bootstrap_servers
    assert meta.get("allowIdleConsumers", "false") == "false"
    # One worker's in-flight window: lag beyond it is work that no worker holds.
    assert int(meta["lagThreshold"]) == sizing.worker.max_in_flight
    # Engine queue depth: waiting in the engines plus held for a slot, ready workers only.
    prom = triggers["prometheus"]
    query = prom["query"]
    exported = exported_captionflow_series()
    names = {n for n, _ in SELECTOR.findall(query)}
    assert {"captionflow_engine_requests", "captionflow_engine_queued_requests",
            "captionflow_ready"} <= names <= set(exported), query
    assert 'state="waiting"' in query and "captionflow_ready" in query
    assert float(prom["threshold"]) == 2 * settings.worker.max_batch_size


def test_keda_scales_down_slower_than_a_model_loads():
    """A pod still loading its model must never be the reason for, or the victim of, a
    scale-down: the scale-down window and cooldown cover the longest load the startup
    probe allows, and readiness (/readyz) gates the rollout."""
    spec = k8s_kind("ScaledObject")["spec"]
    startup = deployment_container()["startupProbe"]
    longest_load_s = startup["failureThreshold"] * startup["periodSeconds"]
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= longest_load_s
    assert spec["cooldownPeriod"] >= longest_load_s
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] > 0
    assert deployment_container()["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_statefulset_gives_each_worker_its_pod_name_as_static_member_id(monkeypatch):
    workload = k8s_kind(WORKLOAD)
    spec = workload["spec"]
    assert spec["serviceName"] == k8s_kind("Service")["metadata"]["name"]
    assert spec["podManagementPolicy"] == "Parallel", "scale-ups must not load one by one"
    env = {e["name"]: e for e in deployment_container()["env"]}
    ref = env[f"{ENV_PREFIX}WORKER__GROUP_INSTANCE_ID"]["valueFrom"]["fieldRef"]
    assert ref["fieldPath"] == "metadata.name"
    assert "group_instance_id" in WorkerSettings.model_fields


def test_shipped_config_lets_the_worker_fill_its_engine(monkeypatch):
    """The old hidden cap (2 x max_batch_size = 16) used half of MAX_NUM_SEQS=32; in-flight
    settings pinned in the ConfigMap would bring it back."""
    settings, sizing = shipped_sizing(monkeypatch)
    w = sizing.worker
    assert w.max_in_engine >= settings.serving.max_num_seqs + settings.worker.max_batch_size
    assert w.max_in_flight >= w.max_in_engine + settings.worker.max_batch_size


def test_k8s_kustomization_lists_every_manifest():
    kustomization = load_yaml(K8S / "kustomization.yaml")
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


# --- compose and Dockerfile -----------------------------------------------------------------

def test_compose_runs_kraft_kafka_topics_gpu_workers_prometheus_grafana(monkeypatch):
    services = compose_services()
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    kenv = env_dict(kafka["environment"])
    assert "controller" in kenv["KAFKA_PROCESS_ROLES"] and "zookeeper" not in json.dumps(services)
    assert kenv["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"

    topics = services["topics"]
    assert topics["command"] == ["topics"]
    assert topics["depends_on"]["kafka"]["condition"] == "service_healthy"

    worker = services["worker"]
    assert worker["command"] == ["serve"]
    assert worker["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert any(v.endswith(":/root/.cache/huggingface") for v in worker["volumes"])
    assert dockerfile_env()["HF_HOME"] == "/root/.cache/huggingface"
    # Topic creation and the workers must agree on names and partitions.
    wset = settings_from_env(monkeypatch, env_dict(worker["environment"]))
    tset = settings_from_env(monkeypatch, env_dict(topics["environment"]))
    assert wset.topics == tset.topics and wset.kafka.bootstrap_servers == "kafka:9092"

    prom_mounts = {m.split(":")[1]: (COMPOSE.parent / m.split(":")[0]).resolve()
                   for m in services["prometheus"]["volumes"] if m.startswith(".")}
    assert prom_mounts["/etc/prometheus"] == PROM
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]


def test_dockerfile_builds_on_the_vllm_image_and_runs_the_cli():
    from captionflow.cli import app

    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms and froms[-1].startswith("vllm/vllm-openai:")
    assert re.search(r"pip install[^\n]* \.", text)
    assert 'ENTRYPOINT ["captionflow"]' in text
    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    used = {"serve", "topics", "publish"}
    assert used <= commands, f"deploy files run `captionflow {sorted(used - commands)}`"
    for path in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, re.M):
        for src in path.split():
            assert (ROOT / src).exists(), f"deploy/Dockerfile copies {src}, missing in the repo"


def test_every_deploy_yaml_parses():
    paths = sorted(DEPLOY.rglob("*.yml")) + sorted(DEPLOY.rglob("*.yaml"))
    assert len(paths) >= 10
    for path in paths:
        assert list(yaml.safe_load_all(path.read_text())), f"{path} is empty"


# --- promtool -------------------------------------------------------------------------------

def promtool(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool not installed (apt-get install prometheus; scripts/setup.sh does)")
    return subprocess.run([exe, *args], cwd=PROM, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args", [
    ("check", "config", "prometheus.yml"),
    ("check", "rules", "alerts.yml"),
    ("test", "rules", "rules_test.yml"),
], ids=["check-config", "check-rules", "test-rules"])
def test_promtool(args):
    result = promtool(*args)
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_every_alert_has_a_unit_test():
    rules = load_yaml(PROM / "alerts.yml")
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert {"CaptionflowConsumerLagGrowing", "CaptionflowDeadLetterRateHigh",
            "CaptionflowNoProgress", "CaptionflowWorkerNotReady", "CaptionflowWorkerDown",
            "CaptionflowEngineDown"} <= alerts
    tests = load_yaml(PROM / "rules_test.yml")["tests"]
    firing = {t["alertname"] for case in tests for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert alerts <= firing, f"no promtool test shows these firing: {sorted(alerts - firing)}"
