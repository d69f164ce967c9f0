"""The API on the embedded default as fixtures: settings, an app under `TestClient`, two
tenants' keys and an uploaded calibration set, shared by every test module that drives the HTTP
API (registered for all tests by `pytest_plugins` in conftest).

Jobs that need not run are given a `not_before` in the future (`LATER`), so the executor leaves
them queued and no test pays for a model pass.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from db import repositories
from service.app import create_app
from service.settings import Settings
from workers.settings import WorkerSettings

WEBHOOK_SECRET = "test-webhook-secret"
UPLOAD_LIMIT = 64 * 1024
LATER = (datetime.now(UTC) + timedelta(days=365)).isoformat()
"""A not-before time that keeps a job queued for the whole test run."""


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        home=tmp_path / "home",
        workers=WorkerSettings(poll_seconds=0.2, sweep_seconds=5.0),
        max_upload_bytes=UPLOAD_LIMIT,
        max_request_bytes=16 * 1024,
        webhook_secret=SecretStr(WEBHOOK_SECRET),
        webhook_backoff_seconds=0.05,
        webhook_attempts=3,
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def key_for(client: TestClient, tenant: str) -> dict[str, str]:
    with client.app.state.session_factory() as session:
        key = repositories.create_api_key(session, tenant=tenant)
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def acme(client: TestClient) -> dict[str, str]:
    return key_for(client, "acme")


@pytest.fixture
def globex(client: TestClient) -> dict[str, str]:
    return key_for(client, "globex")


def npz_bytes(count: int = 4) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(count, 32, 32, 3), dtype=np.uint8)
    np.savez(buffer, images=images, labels=np.arange(count) % 10)
    return buffer.getvalue()


def upload(client: TestClient, headers: dict[str, str], kind: str, name: str, data: bytes) -> Any:
    return client.post(f"/v1/{kind}", headers=headers, files={"file": (name, data)})


@pytest.fixture
def calib_ref(client: TestClient, acme: dict[str, str]) -> str:
    response = upload(client, acme, "datasets", "calib.npz", npz_bytes())
    assert response.status_code == 201, response.text
    return response.json()["ref"]


def job_body(calib: str, **spec: Any) -> dict[str, Any]:
    return {"spec": {"model": "zoo:cifar_resnet20", "calib": calib, **spec}, "not_before": LATER}
