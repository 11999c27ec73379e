"""KubeRay manifests and the image: they parse, their entry points and import paths exist, versions agree."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
IMAGE_ROOT = "/home/ray/tasc_ray/"  # where the Dockerfile puts the checkout


def _ray_pin() -> str:
    match = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert match, "pyproject.toml pins no ray version"
    return match.group(1)


def _manifests() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(INFRA.glob("*.yaml"))}


def _pod_templates(node) -> list[dict]:
    """Every pod template (head and worker groups) anywhere in a manifest."""
    found = []
    if isinstance(node, dict):
        if "template" in node and isinstance(node["template"], dict) and "spec" in node["template"]:
            found.append(node["template"])
        for value in node.values():
            found += _pod_templates(value)
    elif isinstance(node, list):
        for value in node:
            found += _pod_templates(value)
    return found


def test_manifests_parse_with_expected_kinds():
    kinds = {name: doc["kind"] for name, doc in _manifests().items()}
    assert kinds == {
        "raycluster.yaml": "RayCluster",
        "rayjob-finetune.yaml": "RayJob",
        "rayjob-ft-pipeline.yaml": "RayJob",
        "rayjob-index.yaml": "RayJob",
        "rayjob-label.yaml": "RayJob",
        "rayservice.yaml": "RayService",
    }
    for doc in _manifests().values():
        assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]


def test_versions_agree_with_pyproject():
    pin = _ray_pin()
    assert pin == "2.60.0"
    docker = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^ARG RAY_VERSION=(\S+)$", docker, re.M).group(1) == pin
    assert "FROM ${BASE_IMAGE}" in docker and "rayproject/ray:${RAY_VERSION}" in docker
    import ray

    assert ray.__version__ == pin
    clusters = [_manifests()["raycluster.yaml"]["spec"], _manifests()["rayservice.yaml"]["spec"]["rayClusterConfig"]]
    for spec in clusters:
        assert spec["rayVersion"] == pin
        assert spec["authOptions"]["mode"] == "token"  # RAY_AUTH_MODE=token via KubeRay
    groups = {g["groupName"] for g in _manifests()["raycluster.yaml"]["spec"]["workerGroupSpecs"]}
    assert groups == {"cpu", "gpu"}


def test_dockerfile_copies_existing_paths():
    docker = (INFRA / "Dockerfile").read_text()
    for line in docker.splitlines():
        if line.startswith("COPY"):
            sources = [s for s in line.split()[1:-1] if not s.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), source


def test_every_pod_has_shm_memory_volume():
    for name, doc in _manifests().items():
        if doc["kind"] == "RayJob":
            continue  # they run on the RayCluster
        templates = _pod_templates(doc["spec"])
        assert templates, name
        for t in templates:
            volumes = {v["name"]: v for v in t["spec"].get("volumes", [])}
            assert volumes["dshm"]["emptyDir"]["medium"] == "Memory", name
            for c in t["spec"]["containers"]:
                assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"], name


def _job_parser(script: str) -> argparse.ArgumentParser:
    if script == "jobs/batch_label.py":
        from tasc_ray.cli.label import add_label_arguments

        parser = argparse.ArgumentParser()
        add_label_arguments(parser)
        return parser
    if script == "jobs/index_corpus.py":
        from tasc_ray.cli.index import add_index_arguments

        parser = argparse.ArgumentParser()
        add_index_arguments(parser)
        return parser
    if script in ("jobs/finetune.py", "jobs/ft_pipeline.py"):
        from tasc_ray.cli.main import build_parser

        sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
        return sub.choices["finetune" if script == "jobs/finetune.py" else "ft-pipeline"]
    raise AssertionError(f"unknown job script {script}")


@pytest.mark.parametrize(
    "manifest,script",
    [
        ("rayjob-index.yaml", "jobs/index_corpus.py"),
        ("rayjob-finetune.yaml", "jobs/finetune.py"),
        ("rayjob-ft-pipeline.yaml", "jobs/ft_pipeline.py"),
        ("rayjob-label.yaml", "jobs/batch_label.py"),
    ],
)
def test_rayjob_entrypoints_exist_and_parse(manifest, script):
    spec = _manifests()[manifest]["spec"]
    assert spec["clusterSelector"]["ray.io/cluster"] == _manifests()["raycluster.yaml"]["metadata"]["name"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and argv[1] == IMAGE_ROOT + script
    assert (ROOT / script).is_file()
    _job_parser(script).parse_args(argv[2:])  # every flag the manifest passes exists (SystemExit otherwise)


def test_ft_pipeline_rayjob_builds_a_valid_pipeline_config():
    """The ft-pipeline job's flags make a PipelineConfig that validates, with the recipe choice on, and its deploy
    target the head's dashboard service."""
    from tasc_ray.cli.pipeline import pipeline_config

    spec = _manifests()["rayjob-ft-pipeline.yaml"]["spec"]
    args = _job_parser("jobs/ft_pipeline.py").parse_args(shlex.split(spec["entrypoint"])[2:])
    cfg = pipeline_config(args)
    cfg.validate()
    assert cfg.recipe is not None and "recipe" not in cfg.finetune and cfg.finetune["use_gpu"]
    cluster = _manifests()["raycluster.yaml"]["metadata"]["name"]
    assert cfg.serve_address == f"http://{cluster}-head-svc:8265" and cfg.deploy_app


def test_rayservice_serves_the_committed_serve_config():
    service = yaml.safe_load(_manifests()["rayservice.yaml"]["spec"]["serveConfigV2"])
    committed = yaml.safe_load((ROOT / "serve_apps" / "config.yaml").read_text())
    assert service["applications"] == committed["applications"]
    for app in service["applications"]:
        module, attr = app["import_path"].split(":")
        builder = getattr(importlib.import_module(module), attr)
        built = builder.__wrapped__ if hasattr(builder, "__wrapped__") else builder
        assert callable(built)
        from tasc_ray.serving.config import ServeConfig

        config = ServeConfig.model_validate(app["args"])
        assert config.api_key_env == "TASC_API_KEY"
    containers = [c for t in _pod_templates(_manifests()["rayservice.yaml"]["spec"]) for c in t["spec"]["containers"]]
    for c in containers:
        assert any(e["name"] == "TASC_API_KEY" for e in c.get("env", []))
