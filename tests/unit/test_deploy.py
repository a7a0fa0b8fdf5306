"""docker-compose.yml, the Dockerfile and the Kubernetes manifests agree with the code.

No Docker engine runs here, so these checks stand in for `docker compose config`: every service
the files start exists, every environment variable they set is one the config reads, and the
images are the official ones the design names.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from shared.config import ENV_VARS

REPO = Path(__file__).parents[2]
SERVICES = ("ingest", "scoring", "alerting", "query")


def _compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return document


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict)
    return {k: str(v) for k, v in env.items()}


def test_compose_runs_every_service_from_one_image() -> None:
    services = _compose()["services"]
    for name in SERVICES:
        service = services[name]
        assert service["command"] == [f"services.{name}"]
        assert (REPO / "services" / name / "__main__.py").is_file(), name
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert service["image"] == "fraudstream:latest"


def test_compose_uses_official_kafka_and_redis_images() -> None:
    services = _compose()["services"]
    kafka_image = services["kafka"]["image"]
    match = re.fullmatch(r"apache/kafka:(\d+)\.(\d+)\.(\d+)", kafka_image)
    assert match, kafka_image
    assert (int(match[1]), int(match[2])) >= (4, 1)  # 4.0.x lacks what the local broker uses
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert services["redis"]["image"].startswith("redis:")


def test_compose_environment_names_are_config_names() -> None:
    services = _compose()["services"]
    for name in (*SERVICES, "topic-init", "simulator"):
        unknown = set(_environment(services[name])) - set(ENV_VARS)
        assert unknown == set(), f"{name} sets unknown variables {unknown}"
    bootstrap = _environment(services["ingest"])["KAFKA_BOOTSTRAP_SERVERS"]
    assert bootstrap.split(":")[0] == "kafka"
    assert services["topic-init"]["entrypoint"] == ["fraudstream", "topics"]
    assert services["simulator"]["profiles"] == ["simulate"]
    assert services["simulator"]["entrypoint"] == ["fraudstream", "simulate"]


def test_dockerfile_copies_what_exists() -> None:
    dockerfile = (REPO / "deploy/Dockerfile").read_text()
    for source in re.findall(r"^COPY (\S+)", dockerfile, flags=re.MULTILINE):
        assert (REPO / source).exists(), f"Dockerfile copies missing {source}"


def test_kubernetes_manifests_match_services_and_config() -> None:
    seen = set()
    for path in sorted((REPO / "deploy/k8s").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document["kind"] == "ConfigMap":
                assert set(document["data"]) <= set(ENV_VARS)
            if document["kind"] != "Deployment":
                continue
            container = document["spec"]["template"]["spec"]["containers"][0]
            module = container["args"][0]
            assert module.startswith("services.")
            seen.add(module.removeprefix("services."))
            assert {e["name"] for e in container.get("env", [])} <= set(ENV_VARS)
    assert seen == set(SERVICES)
