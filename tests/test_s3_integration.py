"""Machines that share nothing but the database, the broker and a bucket.

`bitplan serve` (Celery executor) and a Celery worker started as `bitplan worker` starts it run
with separate `BITPLAN_HOME`s against PostgreSQL, Redis and an S3 server the test starts itself
(moto's server mode): neither can read the other's disk, and no job names a server path
(`BITPLAN_ALLOWED_INPUT_ROOTS` is unset), so every byte passes through the bucket. Weights and
calibration data are uploaded over HTTP, a ResNet20 job runs on the worker, and its artifacts
(the packed model, the plan, the report) are downloaded through the API, checked against their
listed sha256, and the model loaded. An object that vanishes from the bucket is a 410.
The same job run again on a second worker, with a home of its own, reuses what the first
computed through the cache kept in the database and the bucket (`db.cache.StoreCache`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch

from allocator.apply import load_packed
from allocator.job import JobSpec, JobStatus
from allocator.zoo import load_model
from bench.deploy import Deployment, flushed_redis
from service.client import BitplanClient
from tests.s3_server import Bucket

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REDIS_URL = "redis://127.0.0.1:6379/11"
"""A Redis database number of its own on the shared server, flushed before and after."""
TENANT = "s3-tests"
JOB_SECONDS = 300


@pytest.fixture
def redis_url() -> Iterator[str]:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as error:
        pytest.skip(f"Redis unreachable at {REDIS_URL}: {error}")
    with flushed_redis(REDIS_URL) as url:
        yield url


def deployments(
    names: tuple[str, ...], environ: dict[str, str], tmp_path: Path
) -> list[Deployment]:
    """One deployment per name, sharing PostgreSQL, Redis and the bucket, each with a home
    of its own: machines that cannot read each other's disks."""
    shared = {
        **os.environ,
        **environ,
        "BITPLAN_EXECUTOR": "celery",
        "BITPLAN_LEASE_SECONDS": "5",
        "BITPLAN_SWEEP_SECONDS": "1",
    }
    shared.pop("BITPLAN_ALLOWED_INPUT_ROOTS", None)
    made = []
    for name in names:
        folder = tmp_path / name
        folder.mkdir()
        made.append(Deployment(folder, {**shared, "BITPLAN_HOME": str(folder / "home")}))
    return made


@pytest.fixture
def shared_env(postgres_url: str, redis_url: str, s3_bucket: Bucket) -> dict[str, str]:
    """What every machine is told: the database, the broker and the bucket."""
    return {
        **s3_bucket.env(),
        "BITPLAN_BROKER_URL": redis_url,
        "BITPLAN_DATABASE_URL": postgres_url,
    }


@pytest.fixture
def machines(shared_env: dict[str, str], tmp_path: Path) -> Iterator[tuple[Deployment, Deployment]]:
    """(api, worker): one `bitplan serve`, one Celery worker, each with a home of its own."""
    api, worker = deployments(("api", "worker"), shared_env, tmp_path)
    try:
        worker.start_workers(1)
        api.start_api(1)
        yield api, worker
    finally:
        api.close()
        worker.close()


def test_api_and_worker_share_only_the_bucket(
    machines: tuple[Deployment, Deployment],
    s3_bucket: Bucket,
    resnet20_inputs: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    api, worker = machines
    weights, images = resnet20_inputs
    key = api.create_key(TENANT)
    headers = {"Authorization": f"Bearer {key}"}
    with BitplanClient(api.url, key) as client:
        model_upload = client.upload_model(weights)
        data_upload = client.upload_dataset(images)
        spec = small_job(model_upload.ref, data_upload.ref)
        job = client.submit(spec)
        ended = client.wait(job.id, poll=0.5, timeout=JOB_SECONDS)
        assert ended.status is JobStatus.SUCCEEDED, (ended.error, _logs(api, worker))
        result = client.result(job.id)
        listed = httpx.get(f"{api.url}/v1/jobs/{job.id}/artifacts", headers=headers).json()
        downloads = {
            item["name"]: client.fetch(job.id, item["name"], tmp_path / "got" / item["name"])
            for item in listed
        }

        # What the bucket holds is what bitplan stored, each object under its digest, and
        # apart from those the cache of what the job computed.
        stored = {f"artifacts/sha256/{item['sha256']}" for item in listed}
        stored |= {f"artifacts/sha256/{u.sha256}" for u in (model_upload, data_upload)}
        objects = set(s3_bucket.keys())
        cache = {name for name in objects if name.startswith("artifacts/cache/sha256/")}
        assert cache and objects - cache == stored
        for item in listed:
            assert (
                hashlib.sha256(downloads[item["name"]].read_bytes()).hexdigest() == (item["sha256"])
            )

        # Gone from the bucket and from the API's cache: 410, naming nothing of the deployment.
        report = next(item for item in listed if item["name"] == "report")
        s3_bucket.client().delete_object(
            Bucket=s3_bucket.name, Key=f"artifacts/sha256/{report['sha256']}"
        )
        shutil.rmtree(api.folder / "home" / "store-cache")
        gone = httpx.get(f"{api.url}/v1/jobs/{job.id}/artifacts/report", headers=headers)

    assert {"model", "bitplan", "profile", "report"} <= set(downloads)
    module, plan = load_packed(downloads["model"], load_model("zoo:cifar_resnet20").module)
    assert plan.weight_bits == {
        entry["layer"]: entry["weight_bits"] for entry in result["allocation"]
    }
    with torch.no_grad():
        assert torch.isfinite(module.eval()(torch.zeros(2, 3, 32, 32))).all()
    assert json.loads(downloads["bitplan"].read_text())
    assert b"<html" in downloads["report"].read_bytes()[:2000].lower()

    assert gone.status_code == 410, gone.text
    for text in (gone.text, json.dumps(result)):
        for secret in (s3_bucket.name, s3_bucket.endpoint, str(tmp_path)):
            assert secret not in text

    # Each side read the other's files through the bucket only: no artifact folder was made,
    # the worker's cache holds the uploads it fetched, the API's the artifacts it served.
    api_home, worker_home = api.folder / "home", worker.folder / "home"
    assert not (api_home / "artifacts").exists() and not (worker_home / "artifacts").exists()
    worker_cached = _cached(worker_home)
    assert {model_upload.sha256, data_upload.sha256} <= worker_cached
    assert {item["sha256"] for item in listed} <= worker_cached  # written through its cache
    assert "] received" in (worker.folder / "worker-0.log").read_text(), "no Celery task"


def test_a_job_again_on_another_worker_reuses_what_the_first_computed(
    shared_env: dict[str, str], resnet20_inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    """The same job twice, the first on worker A, the second on worker B (A stopped before
    it is submitted), homes apart: B finds A's statistics and evaluations in the cache the
    database and the bucket hold, and returns the same plan."""
    api, worker_a, worker_b = deployments(("api", "worker-a", "worker-b"), shared_env, tmp_path)
    weights, images = resnet20_inputs
    try:
        worker_a.start_workers(1)
        api.start_api(1)
        with BitplanClient(api.url, api.create_key(TENANT)) as client:
            spec = small_job(client.upload_model(weights).ref, client.upload_dataset(images).ref)
            jobs, results = [], []
            for worker in (worker_a, worker_b):
                if worker is worker_b:
                    worker_a.close()
                    worker_b.start_workers(1)
                job = client.submit(spec)
                ended = client.wait(job.id, poll=0.5, timeout=JOB_SECONDS)
                assert ended.status is JobStatus.SUCCEEDED, (ended.error, _logs(api, worker))
                jobs.append(job.id)
                results.append(client.result(job.id))
    finally:
        for deployment in (api, worker_a, worker_b):
            deployment.close()

    first, second = results
    assert "statistics" not in first["reused"]
    assert {"statistics", "evaluations"} <= set(second["reused"]), second["reused"]
    assert second["allocation"] == first["allocation"]
    assert second["metrics"] == first["metrics"]
    # Each job ran on its own worker, and B's own folder cache had nothing to give.
    log_a, log_b = (worker.folder / "worker-0.log" for worker in (worker_a, worker_b))
    assert jobs[0] in log_a.read_text() and jobs[1] not in log_a.read_text()
    assert jobs[1] in log_b.read_text()
    assert not list((worker_b.folder / "home" / "cache").glob("??/*"))


def test_a_job_split_over_two_workers_returns_the_plan_of_one(
    shared_env: dict[str, str], resnet20_inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    """Two workers with homes apart: the job's statistics in four parts, at least one
    computed by the worker not running the job and handed over through the bucket; the plan
    and metrics are those of the same job unsplit (both reuse nothing)."""
    api, *workers = deployments(("api", "worker-a", "worker-b"), shared_env, tmp_path)
    weights, images = resnet20_inputs
    try:
        for worker in workers:
            worker.start_workers(1)
        api.start_api(1)
        with BitplanClient(api.url, api.create_key(TENANT)) as client:
            spec = replace(
                small_job(client.upload_model(weights).ref, client.upload_dataset(images).ref),
                reuse=False,
            )
            results = []
            for parts in (4, 1):
                job = client.submit(replace(spec, statistics_parts=parts))
                ended = client.wait(job.id, poll=0.5, timeout=JOB_SECONDS)
                assert ended.status is JobStatus.SUCCEEDED, (ended.error, _logs(api, *workers))
                results.append(client.result(job.id))
    finally:
        for deployment in (api, *workers):
            deployment.close()

    split, alone = results
    statistics = split["phases"]["statistics"]
    assert statistics["parts"] == 4 and statistics["parts_by_helpers"] >= 1, statistics
    assert "parts" not in alone["phases"]["statistics"]
    assert split["allocation"] == alone["allocation"]
    assert split["metrics"] == alone["metrics"]
    logs = [(worker.folder / "worker-0.log").read_text() for worker in workers]
    runner = next(i for i, text in enumerate(logs) if f"job {split['job_id']}: attempt" in text)
    assert f"job {split['job_id']}: statistics part" in logs[1 - runner], _logs(*workers)


def small_job(model_ref: str, data_ref: str) -> JobSpec:
    """A ResNet20 job that runs in seconds on the random inputs."""
    return JobSpec(
        model="zoo:cifar_resnet20",
        weights=model_ref,
        calib=data_ref,
        budget="avg-bits=6",
        method="fisher",
        bits=(4, 8),
        calib_samples=16,
        batch_size=16,
        eval_samples=16,
        report_widths=False,
        context_rounds=0,
    )


def _cached(home: Path) -> set[str]:
    cache = home / "store-cache"
    return {path.name for path in cache.glob("??/*") if path.is_file()}


def _logs(*deployments: Deployment) -> str:
    return "\n".join(
        f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}"
        for deployment in deployments
        for log in sorted(deployment.folder.glob("*.log"))
    )
