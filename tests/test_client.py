"""`service.client` and the `bitplan submit|status|wait|fetch|keys` commands against a real
uvicorn server on loopback (embedded: SQLite and the inline executor).

A finished job is produced the way a worker finishes one, through `db.repositories` (claim, then
finish with a stored artifact), so these tests stay fast; a job that really runs the pipeline
over HTTP is in test_api_integration.py.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import uvicorn
from safetensors.torch import save_file
from typer.testing import CliRunner

from allocator.job import JobSpec
from db import repositories
from db.repositories import ArtifactRecord
from db.store import sha256_uri
from service.app import create_app
from service.cli import app as cli
from service.client import ApiError, BitplanClient, JobEnded
from service.settings import Settings
from workers.settings import WorkerSettings

LATER = (datetime.now(UTC) + timedelta(days=365)).isoformat()


class _Server:
    """A uvicorn server on a free loopback port, in a thread of this process."""

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )

    def __enter__(self) -> _Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.socket.close()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def server(home: Path) -> Iterator[_Server]:
    settings = Settings(home=home, workers=WorkerSettings(poll_seconds=0.2))
    with _Server(settings) as running:
        yield running


@pytest.fixture
def key(server: _Server) -> str:
    with server.app.state.session_factory() as session:
        return repositories.create_api_key(session, tenant="acme")


@pytest.fixture
def client(server: _Server, key: str) -> Iterator[BitplanClient]:
    with BitplanClient(server.url, key) as api:
        yield api


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    weights = tmp_path / "w.safetensors"
    save_file({"weight": torch.ones(3, 3)}, weights)
    calib = tmp_path / "calib.npz"
    images = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    np.savez(calib, images=images, labels=np.arange(4))
    return {"weights": weights, "calib": calib}


def _finish(server: _Server, job_id: str, payload: dict[str, object]) -> bytes:
    """Finish a queued job as a worker would; returns the artifact's bytes."""
    data = b"packed weights"
    stored = server.app.state.store.put_bytes(data)
    with server.app.state.session_factory() as session:
        claimed = repositories.claim_job(
            session, job_id=job_id, worker_id="test-worker", lease_seconds=60
        )
        assert claimed is not None
        repositories.finish_job(
            session,
            job_id=job_id,
            bit_plan={},
            metrics={},
            solver={},
            result={**payload, "job_id": job_id, "profile": {"cost": []}},
            artifacts=[ArtifactRecord("model", "packed-safetensors", *stored)],
        )
    return data


def test_client_uploads_submits_and_reads_back(
    client: BitplanClient, files: dict[str, Path], server: _Server, tmp_path: Path
) -> None:
    weights = client.upload_model(files["weights"])
    assert client.upload_model(files["weights"]).id == weights.id
    calib = client.upload_dataset(files["calib"])
    spec = JobSpec(model="zoo:cifar_resnet20", weights=weights.ref, calib=calib.ref)
    job = client.submit(spec, not_before=LATER, idempotency_key="k1")
    assert client.submit(spec, not_before=LATER, idempotency_key="k1").id == job.id
    assert client.status(job.id).status.value == "queued"
    with pytest.raises(ApiError) as refused:
        client.result(job.id)
    assert refused.value.status == 409

    data = _finish(server, job.id, {"model": spec.model, "budget": spec.budget})
    assert client.wait(job.id, poll=0.05).status.value == "succeeded"
    result = client.wait_result(job.id, poll=0.05)
    assert result == {"job_id": job.id, "model": spec.model, "budget": spec.budget}
    target = client.fetch(job.id, "model", tmp_path / "out" / "model.safetensors")
    assert target.read_bytes() == data
    with pytest.raises(ApiError) as missing:
        client.fetch(job.id, "report", tmp_path / "out" / "report.html")
    assert missing.value.status == 404
    assert not (tmp_path / "out" / "report.html").exists()
    server.app.state.store.path(sha256_uri(hashlib.sha256(data).hexdigest())).unlink()
    with pytest.raises(ApiError) as gone:
        client.fetch(job.id, "model", tmp_path / "out" / "again.safetensors")
    assert gone.value.status == 410 and "no longer stored" in str(gone.value)


def test_wait_raises_for_a_cancelled_job(client: BitplanClient, files: dict[str, Path]) -> None:
    calib = client.upload_dataset(files["calib"])
    job = client.submit(JobSpec(model="zoo:cifar_resnet20", calib=calib.ref), not_before=LATER)
    client.cancel(job.id)
    with pytest.raises(JobEnded, match="cancelled"):
        client.wait_result(job.id, poll=0.05)


def test_client_reports_the_servers_reason(client: BitplanClient, files: dict[str, Path]) -> None:
    calib = client.upload_dataset(files["calib"])
    with pytest.raises(ApiError) as refused:
        client.submit(JobSpec(model="zoo:cifar_resnet20", calib=calib.ref, budget="tiny"))
    assert (refused.value.status, refused.value.error) == (422, "BadBudget")
    assert "avg-bits=4" in refused.value.detail
    broken = files["calib"].with_name("broken.pt")
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ApiError) as corrupt:
        client.upload_model(broken)
    assert corrupt.value.status in (415, 422)


def _run(home: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), env={"BITPLAN_HOME": str(home)})
    return result.exit_code, result.stdout, result.stderr


def test_cli_keys_submit_status_wait_fetch(
    server: _Server, home: Path, files: dict[str, Path], tmp_path: Path
) -> None:
    code, out, _ = _run(home, "keys", "create", "--tenant", "acme")
    assert code == 0
    key = out.strip()
    assert key.startswith("bp_")
    remote = ("--server", server.url, "--key", key)

    code, out, err = _run(
        home,
        "submit",
        "--model",
        "zoo:cifar_resnet20",
        "--weights",
        str(files["weights"]),
        "--calib",
        str(files["calib"]),
        "--budget",
        "avg-bits=3",
        "--not-before",
        LATER,
        *remote,
    )
    assert code == 0, err
    job_id = out.strip()
    with BitplanClient(server.url, key) as api:
        spec = api.status(job_id).spec
    assert spec["weights"].startswith("upload:") and spec["calib"].startswith("upload:")
    assert spec["budget"] == "avg-bits=3"

    code, out, _ = _run(home, "status", job_id, *remote)
    assert (code, out.split()[:2]) == (0, [job_id, "queued"])

    payload = {"model": "zoo:cifar_resnet20", "budget": "avg-bits=3"}
    data = _finish(server, job_id, payload)
    code, out, _ = _run(home, "wait", job_id, "--json", "--poll", "0.05", *remote)
    assert code == 0
    assert json.loads(out) == {**payload, "job_id": job_id}

    target = tmp_path / "fetched.safetensors"
    code, out, _ = _run(home, "fetch", job_id, "model", "-o", str(target), *remote)
    assert (code, target.read_bytes()) == (0, data)

    code, _, err = _run(home, "fetch", job_id, "report", *remote)
    assert code == 2 and "no artifact" in err


def test_cli_wait_exits_1_for_a_cancelled_job_and_2_for_a_bad_key(
    server: _Server, home: Path, key: str, files: dict[str, Path]
) -> None:
    remote = ("--server", server.url, "--key", key)
    code, out, err = _run(
        home,
        "submit",
        "--model",
        "zoo:cifar_resnet20",
        "--calib",
        str(files["calib"]),
        "--not-before",
        LATER,
        *remote,
    )
    assert code == 0, err
    job_id = out.strip()
    with BitplanClient(server.url, key) as api:
        api.cancel(job_id)
    code, _, err = _run(home, "wait", job_id, "--json", *remote)
    assert code == 1 and "cancelled" in err
    code, _, err = _run(home, "status", job_id, "--server", server.url, "--key", "bp_x_y")
    assert code == 2 and "401" in err
    code, _, err = _run(home, "status", job_id, "--server", "http://127.0.0.1:9", "--key", key)
    assert code == 3
