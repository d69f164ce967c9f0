"""The `gpu` queue, without a GPU: `bitplan worker --queue gpu --device ...` option parsing, the
API taking `queue: "gpu"` and refusing a device that is not one, and (integration) a real
`bitplan worker --queue gpu --device cpu` on PostgreSQL and Redis running the jobs sent to the
`gpu` queue and only those, failing in one line a job that asks for CUDA on this machine.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

from allocator.job import JobStatus
from bench.deploy import tiny_spec
from db.models import ResultRow
from service.cli import admin, app
from tests.api_app import job_body
from tests.test_workers_integration import (  # noqa: F401  (fixtures used by name)
    Fleet,
    Worker,
    fleet_on,
    plugins,
    sessions,
    shared_redis,
)
from workers.settings import BATCH_QUEUE, GPU_QUEUE, INTERACTIVE_QUEUE, WorkerSettings

NO_CUDA = not torch.cuda.is_available()


# --- bitplan worker's options -------------------------------------------------------------------


@pytest.fixture
def device_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """`worker_queues` hands the device to the Celery app through BITPLAN_DEVICE: restore it."""
    monkeypatch.delenv("BITPLAN_DEVICE", raising=False)


@pytest.mark.usefixtures("device_env")
def test_a_cpu_worker_serves_the_cpu_queues_unless_told_otherwise() -> None:
    assert admin.worker_queues(None, None) == (INTERACTIVE_QUEUE, BATCH_QUEUE)
    assert "BITPLAN_DEVICE" not in os.environ
    assert admin.worker_queues(None, "cpu") == (INTERACTIVE_QUEUE, BATCH_QUEUE)
    assert admin.worker_queues([GPU_QUEUE], "cpu") == (GPU_QUEUE,)
    assert os.environ["BITPLAN_DEVICE"] == "cpu"
    assert WorkerSettings.from_env().device == "cpu"


@pytest.mark.usefixtures("device_env")
def test_a_gpu_worker_also_serves_the_gpu_queue_and_tells_its_jobs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("allocator.device.cuda_devices_without_init", lambda: 2)
    assert admin.worker_queues(None, "cuda") == (INTERACTIVE_QUEUE, BATCH_QUEUE, GPU_QUEUE)
    assert admin.worker_queues([GPU_QUEUE], "cuda:1") == (GPU_QUEUE,)
    assert WorkerSettings.from_env().device == "cuda:1"  # what its job processes will read
    with pytest.raises(Exception, match=r"has 2 GPU\(s\)"):
        admin.worker_queues([GPU_QUEUE], "cuda:2")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.usefixtures("device_env")
def test_bitplan_worker_with_cuda_on_a_cpu_machine_refuses_to_start_in_one_line() -> None:
    done = CliRunner().invoke(app, ["worker", "--queue", "gpu", "--device", "cuda"])
    assert done.exit_code == 2, done.output
    lines = [line for line in done.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "0 GPU(s)" in lines[0] and "--device cpu" in lines[0]


@pytest.mark.usefixtures("device_env")
def test_bitplan_worker_refuses_a_device_that_is_not_one() -> None:
    done = CliRunner().invoke(app, ["worker", "--device", "tpu"])
    assert done.exit_code == 2 and "is not cpu, cuda or cuda:N" in done.output


def test_a_bad_worker_device_in_the_environment_names_the_variable() -> None:
    with pytest.raises(ValueError, match="BITPLAN_DEVICE='gpu0' is not valid"):
        WorkerSettings.from_env({"BITPLAN_DEVICE": "gpu0"})


# --- the API ------------------------------------------------------------------------------------


def test_the_api_queues_a_job_on_the_gpu_queue_with_its_device(
    client: TestClient, acme: dict[str, str], calib_ref: str
) -> None:
    body = {**job_body(calib_ref, device="cuda"), "queue": "gpu"}
    response = client.post("/v1/jobs", headers=acme, json=body)
    assert response.status_code == 202, response.text
    assert response.json()["queue"] == "gpu"
    assert response.json()["spec"]["device"] == "cuda"


@pytest.mark.parametrize("device", ["tpu", "cuda:64", "cuda:0;rm"])
def test_the_api_refuses_a_device_that_is_not_one(
    client: TestClient, acme: dict[str, str], calib_ref: str, device: str
) -> None:
    response = client.post("/v1/jobs", headers=acme, json=job_body(calib_ref, device=device))
    assert response.status_code == 422
    assert "is not cpu, cuda or cuda:N" in response.json()["detail"]


# --- a real worker on the gpu queue -------------------------------------------------------------


class GpuQueueWorker(Worker):
    """`bitplan worker --queue gpu --device cpu`, the command a GPU host runs with --device cuda."""

    command = (
        sys.executable,
        *("-m", "service.cli", "worker", "--queue", GPU_QUEUE, "--device", "cpu"),
    )


@pytest.mark.integration
def test_jobs_sent_to_the_gpu_queue_run_on_the_worker_serving_it(
    fleet_on: Callable[[str], Fleet],  # noqa: F811
    shared_redis: str,  # noqa: F811
    plugins: Path,  # noqa: F811
) -> None:
    fleet = fleet_on(shared_redis)
    worker = GpuQueueWorker(fleet.env, fleet.folder / "gpu-worker.log")
    fleet.workers.append(worker)
    elsewhere = fleet.submit(tiny_spec(plugins), queue=INTERACTIVE_QUEUE)
    routed = fleet.submit(tiny_spec(plugins), queue=GPU_QUEUE)
    asking_cuda = fleet.submit(tiny_spec(plugins, device="cuda"), queue=GPU_QUEUE)

    done = fleet.wait_ended(routed)
    assert done.status is JobStatus.SUCCEEDED, done.error
    with fleet.sessions() as session:
        result = session.scalars(select(ResultRow).where(ResultRow.job_id == routed)).one()
    assert result.result["device"]["device"] == "cpu"  # the worker's --device

    refused = fleet.wait_ended(asking_cuda)
    if NO_CUDA:
        assert refused.status is JobStatus.FAILED
        assert refused.attempts == 1  # failed for good, not retried
        assert "asks for cuda" in (refused.error or "") and "\n" not in (refused.error or "")
        assert "--device cpu" in (refused.error or "")

    # Nothing serves `interactive` here: the job sent there is still waiting for its workers.
    assert fleet.job(elsewhere).status is JobStatus.QUEUED
    log = worker.log_path.read_text(errors="replace")
    assert f".> {GPU_QUEUE} " in log and f".> {INTERACTIVE_QUEUE} " not in log
