"""Static checks of how `captionflow sink` ships in deploy/: compose, Kubernetes
(deploy/k8s/sink) and Prometheus agree with the sink's settings, port, paths and grace."""

from __future__ import annotations

import re

import yaml

from captionflow.config import SinkSettings
from tests.test_deploy import COMPOSE, DEPLOY, PROM, compose_services, duration_s, env_dict, \
    load_yaml, settings_from_env

K8S_SINK = DEPLOY / "k8s" / "sink"
PORT = SinkSettings().metrics_port


def sink_docs() -> dict[str, dict]:
    docs: dict[str, dict] = {}
    for path in sorted(K8S_SINK.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") != "Kustomization":
                assert doc["kind"] not in docs, f"two {doc['kind']} in deploy/k8s/sink"
                docs[doc["kind"]] = doc
    return docs


def test_compose_sink_writes_to_the_minio_bucket_with_its_port_and_grace(monkeypatch):
    services = compose_services()
    sink = services["sink"]
    assert sink["command"][0] == "sink"
    settings = settings_from_env(monkeypatch, env_dict(sink["environment"]))
    assert settings.sink.to == "s3://datasets/"
    assert "local/datasets" in " ".join(services["minio-bucket"]["command"])
    assert settings.sink.metrics_port == PORT
    assert any(str(p).split(":")[-1] == str(PORT) for p in sink["ports"])
    check = " ".join(sink["healthcheck"]["test"])
    assert re.findall(r"http://[\w.]+:(\d+)(/\w+)", check) == [(str(PORT), "/readyz")]
    assert duration_s(sink["stop_grace_period"]) > settings.sink.shutdown_grace_s
    assert sink["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    worker = settings_from_env(monkeypatch, env_dict(services["worker"]["environment"]))
    assert settings.topics == worker.topics and settings.kafka == worker.kafka
    assert settings.sink.group_id != worker.worker.group_id


def test_prometheus_scrapes_the_sink():
    jobs = {j["job_name"]: j for j in load_yaml(PROM / "prometheus.yml")["scrape_configs"]}
    job = jobs["captionflow-sink"]
    [sd] = job["dns_sd_configs"]
    assert sd["port"] == PORT and sd["names"] == ["sink"]
    assert "sink" in load_yaml(COMPOSE)["services"]


def test_k8s_sink_kustomization_lists_every_manifest():
    kustomization = load_yaml(K8S_SINK / "kustomization.yaml")
    files = {p.name for p in K8S_SINK.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_k8s_sink_probes_port_grace_and_settings(monkeypatch):
    docs = sink_docs()
    deployment, config = docs["Deployment"], docs["ConfigMap"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["args"][0] == "sink"
    assert container["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    settings = settings_from_env(monkeypatch, {k: str(v) for k, v in config["data"].items()})
    assert settings.sink.to and settings.sink.metrics_port == PORT
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named["metrics"] == PORT
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert pod["terminationGracePeriodSeconds"] > settings.sink.shutdown_grace_s
    assert "nvidia.com/gpu" not in str(container["resources"])
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "sink"
    for kind in ("Service", "PodMonitor"):
        selector = docs[kind]["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= labels.items(), kind
    assert [(p["port"], named[p["targetPort"]]) for p in docs["Service"]["spec"]["ports"]] == [
        (PORT, PORT)]
    [endpoint] = docs["PodMonitor"]["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
