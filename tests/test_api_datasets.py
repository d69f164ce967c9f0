"""Dataset and model uploads over HTTP that must be refused cheaply and without server paths.

The API checks an upload with the readers a worker uses, under the operator's
`max_dataset_bytes`; these tests set that limit low and send a decompression bomb that fits the
upload limit, then check the answer, that nothing was stored and what the process allocated.
"""

from __future__ import annotations

import io
import math
import tracemalloc
from dataclasses import replace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from db.models import Upload
from service.settings import Settings
from tests.api_app import npz_bytes, upload
from workers.settings import WorkerSettings

DATASET_LIMIT = 1 << 20
"""The operator's dataset limit in these tests: above `npz_bytes()`, far below the bomb."""
BOMB_SHAPE = (10, 1000, 1000, 3)
"""30 MB of zeros declared; savez_compressed stores them in about 30 KB, under the upload limit."""


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The shared settings with the dataset limit set the way an operator sets it."""
    operator = WorkerSettings.from_env({"BITPLAN_MAX_DATASET_BYTES": str(DATASET_LIMIT)})
    workers = replace(
        operator,
        poll_seconds=settings.workers.poll_seconds,
        sweep_seconds=settings.workers.sweep_seconds,
    )
    return settings.model_copy(update={"workers": workers})


def bomb_bytes() -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=np.zeros(BOMB_SHAPE, dtype=np.uint8))
    return buffer.getvalue()


def upload_count(client: TestClient) -> int:
    with client.app.state.session_factory() as session:
        return session.scalar(select(func.count()).select_from(Upload))


def test_a_decompression_bomb_is_refused_under_the_operators_limit_storing_nothing(
    client: TestClient, acme: dict[str, str]
) -> None:
    data = bomb_bytes()
    declared = math.prod(BOMB_SHAPE)

    tracemalloc.start()
    try:
        response = upload(client, acme, "datasets", "bomb.npz", data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert response.status_code in (413, 422), response.text
    assert f"limit of {DATASET_LIMIT} bytes" in response.json()["detail"]
    assert peak < declared / 4
    assert upload_count(client) == 0
    assert client.get("/v1/jobs", headers=acme).status_code == 200


def test_a_dataset_within_the_operators_limit_is_stored(
    client: TestClient, acme: dict[str, str]
) -> None:
    response = upload(client, acme, "datasets", "calib.npz", npz_bytes())
    assert response.status_code == 201, response.text
    assert upload_count(client) == 1


@pytest.mark.parametrize(
    ("kind", "name", "status"),
    [
        ("datasets", "my-calib.npz", 422),
        ("models", "my-weights.safetensors", 422),
        ("models", "my.pt", 415),
    ],
)
def test_upload_errors_name_the_clients_file_not_the_servers_copy(
    client: TestClient, acme: dict[str, str], settings: Settings, kind: str, name: str, status: int
) -> None:
    """The status shows the error kept its type (a pickle is 415) when its message was rewritten."""
    response = upload(client, acme, kind, name, b"neither an archive nor weights")

    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert name in detail
    assert "/tmp" not in detail and str(settings.home) not in detail
    assert "upload-" not in detail
