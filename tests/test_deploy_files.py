"""The compose file and Dockerfile describe the topology the integration tests start by hand.

No Docker engine runs here, so the checks are the offline ones: the compose file parses, names
the services the design asks for, and every bitplan command in it is one the CLI accepts.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from db.store import StoreConfig, parse_s3_url
from service.cli import app

ROOT = Path(__file__).resolve().parents[1]


def test_compose_has_the_distributed_topology() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"api", "worker", "redis", "postgres", "minio", "flower"} <= set(services)
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["BITPLAN_DATABASE_URL"].startswith("postgresql://")
        assert env["BITPLAN_BROKER_URL"].startswith("redis://redis:")
        assert env["BITPLAN_EXECUTOR"] == "celery"


def test_compose_api_and_workers_share_only_the_bucket() -> None:
    """No volume in common: files travel through MinIO, in the bucket its init job creates."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    api, worker = services["api"], services["worker"]
    assert not set(api.get("volumes", [])) & set(worker.get("volumes", []))
    for service in (api, worker):
        env = service["environment"]
        bucket, _prefix = parse_s3_url(StoreConfig(env["BITPLAN_STORE_URL"]).url)
        assert env["BITPLAN_S3_ENDPOINT_URL"] == "http://minio:9000"
        assert env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"]
        assert service["depends_on"]["minio-bucket"]["condition"] == (
            "service_completed_successfully"
        )
        assert f"local/{bucket}" in " ".join(services["minio-bucket"]["entrypoint"])


def test_compose_commands_are_valid_cli_invocations() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name in ("api", "worker"):
        command = compose["services"][name]["command"]
        assert command[0] == "bitplan"
        result = CliRunner().invoke(app, [*command[1:2], "--help"])
        assert result.exit_code == 0, result.output
        options = {part for part in command[2:] if part.startswith("--")}
        assert all(option in result.output for option in options), (name, options)


def test_dockerfile_installs_the_package_and_serves() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "pip install '.[bench]'" in text
    assert '"bitplan", "serve"' in text
