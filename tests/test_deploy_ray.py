"""Static checks of how `captionflow run --ray` ships in deploy/ray: the KubeRay RayJob runs
a command the CLI has, with real settings, on a cluster whose CPU group takes the decode
tasks and whose GPU group holds exactly the engine actors the command asks for."""

from __future__ import annotations

import re
import shlex
import tomllib

import typer.main
import yaml
from packaging.specifiers import SpecifierSet

from captionflow.cli import app
from tests.test_deploy import DEPLOY, ROOT, settings_from_env

RAY = DEPLOY / "ray"
GPU = "nvidia.com/gpu"


def rayjob() -> dict:
    docs = [d for d in yaml.safe_load_all((RAY / "rayjob.yaml").read_text()) if d]
    [job] = [d for d in docs if d["kind"] == "RayJob"]
    return job


def containers(template: dict) -> list[dict]:
    return template["spec"]["containers"]


def test_rayjob_runs_captionflow_run_ray_with_real_flags_and_settings(monkeypatch):
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["captionflow", "run", "--ray"]
    run = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]
    flags = {opt for p in run.params for opt in p.opts}
    used = {a for a in argv if a.startswith("--")}
    assert used <= flags, f"not flags of `captionflow run`: {sorted(used - flags)}"
    assert "--ray-address" not in argv  # the job's driver joins its cluster by RAY_ADDRESS
    head = containers(job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"])[0]
    env = {e["name"]: e["value"] for e in head.get("env", [])}
    settings = settings_from_env(monkeypatch, env)  # raises on a setting that does not exist
    assert settings.serving.backend == "vllm"

    # The head runs the driver only; the CPU group decodes; the GPU group advertises one CPU
    # per pod (the engine actor's), so no decode task lands there.
    spec = job["spec"]["rayClusterSpec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    cpu = [g for g in groups.values()
           if not any(GPU in c["resources"]["limits"] for c in containers(g["template"]))]
    gpu = [g for g in groups.values() if g not in cpu]
    assert len(cpu) == 1 and len(gpu) == 1, sorted(groups)
    [cpu_group], [gpu_group] = cpu, gpu
    assert cpu_group["maxReplicas"] > cpu_group["minReplicas"] and spec["enableInTreeAutoscaling"]
    assert gpu_group["rayStartParams"]["num-cpus"] == "1"
    engines = int(argv[argv.index("--ray-engines") + 1])
    gpus = int(containers(gpu_group["template"])[0]["resources"]["limits"][GPU])
    assert gpus == settings.serving.tensor_parallel_size
    assert gpu_group["minReplicas"] == gpu_group["maxReplicas"] == engines, \
        "one engine actor per GPU pod: --ray-engines must equal the GPU group's size"

    # One image everywhere, with the Ray version the `ray` extra allows.
    images = {c["image"] for g in [spec["headGroupSpec"], *groups.values()]
              for c in containers(g["template"])}
    assert len(images) == 1
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())[
        "project"]["optional-dependencies"]["ray"]
    [requirement] = extra
    allowed = SpecifierSet(re.sub(r"^ray\[[\w,]+\]", "", requirement))
    assert spec["rayVersion"] in allowed, (spec["rayVersion"], requirement)
    [installed] = re.findall(r'"ray\[[\w,]+\]([^"]+)"', (RAY / "Dockerfile").read_text())
    assert SpecifierSet(installed) == allowed, "deploy/ray/Dockerfile installs another Ray"
