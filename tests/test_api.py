"""The HTTP API on the embedded default: SQLite, the artifact store in a temp folder and the real
inline executor, driven through FastAPI's TestClient.

Jobs that need not run are given a `not_before` in the future, so the executor leaves them queued
and no test pays for a model pass; the full run over HTTP is in test_api_integration.py.
"""

from __future__ import annotations

import io
import pickle
import uuid
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save

from allocator.job import JobSpec
from allocator.layers import Layer
from db import repositories
from db.repositories import ProfileKey
from service.app import create_app
from service.settings import Settings
from tests.api_app import LATER, UPLOAD_LIMIT, job_body, key_for, npz_bytes, upload
from workers.record import profile_key
from workers.settings import ExecutorKind, WorkerSettings

# --- auth and tenants ----------------------------------------------------------------------------


def test_missing_or_wrong_key_is_401(client: TestClient, acme: dict[str, str]) -> None:
    assert client.get("/v1/jobs").status_code == 401
    wrong = {"Authorization": "Bearer bp_0000_not-a-key"}
    response = client.get("/v1/jobs", headers=wrong)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert client.get("/v1/jobs", headers={"Authorization": "Basic abc"}).status_code == 401
    assert client.get("/v1/jobs", headers=acme).status_code == 200


def _revoke(client: TestClient, headers: dict[str, str], tenant: str) -> None:
    prefix = headers["Authorization"].split("_")[1]
    with client.app.state.session_factory() as session:
        assert repositories.revoke_api_key(session, tenant=tenant, prefix=prefix)
        session.commit()


def test_a_revoked_key_is_refused_once_its_cache_entry_expires(
    client: TestClient, acme: dict[str, str]
) -> None:
    assert client.get("/v1/jobs", headers=acme).status_code == 200
    _revoke(client, acme, "acme")
    # Within the cache window the process still trusts the key it verified a moment ago...
    assert client.get("/v1/jobs", headers=acme).status_code == 200
    client.app.state.key_cache.ttl = 0
    # ...and asks the database again once the entry is gone.
    assert client.get("/v1/jobs", headers=acme).status_code == 401


def test_without_the_key_cache_revocation_is_immediate(settings: Settings) -> None:
    with TestClient(create_app(settings.model_copy(update={"key_cache_seconds": 0}))) as client:
        acme = key_for(client, "acme")
        assert client.get("/v1/jobs", headers=acme).status_code == 200
        _revoke(client, acme, "acme")
        assert client.get("/v1/jobs", headers=acme).status_code == 401


def test_a_tenant_sees_only_its_own_objects(
    client: TestClient, acme: dict[str, str], globex: dict[str, str], calib_ref: str
) -> None:
    job = client.post("/v1/jobs", headers=acme, json=job_body(calib_ref)).json()
    for method, path in (
        ("GET", f"/v1/jobs/{job['id']}"),
        ("POST", f"/v1/jobs/{job['id']}/cancel"),
        ("GET", f"/v1/jobs/{job['id']}/result"),
        ("GET", f"/v1/jobs/{job['id']}/artifacts"),
        ("GET", f"/v1/jobs/{job['id']}/artifacts/model"),
    ):
        assert client.request(method, path, headers=globex).status_code == 404, path
    assert client.get("/v1/jobs", headers=globex).json()["jobs"] == []
    # Another tenant's upload cannot be named in a job either.
    response = client.post("/v1/jobs", headers=globex, json=job_body(calib_ref))
    assert response.status_code == 422
    assert "upload the file first" in response.json()["detail"]
    assert client.get(f"/v1/jobs/{job['id']}", headers=acme).json()["status"] == "queued"


# --- uploads -------------------------------------------------------------------------------------


def test_uploads_are_deduplicated_by_content(client: TestClient, acme: dict[str, str]) -> None:
    data = save({"weight": torch.arange(12, dtype=torch.float32).view(3, 4)})
    first = upload(client, acme, "models", "w.safetensors", data)
    again = upload(client, acme, "models", "renamed.safetensors", data)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    assert first.json()["size"] == len(data)
    assert first.json()["ref"] == f"upload:{first.json()['id']}"


def test_a_torch_state_dict_is_accepted(client: TestClient, acme: dict[str, str]) -> None:
    buffer = io.BytesIO()
    torch.save({"state_dict": {"weight": torch.ones(2, 2)}}, buffer)
    response = upload(client, acme, "models", "w.pth", buffer.getvalue())
    assert response.status_code == 201, response.text


def test_upload_above_the_limit_is_413(client: TestClient, acme: dict[str, str]) -> None:
    response = upload(client, acme, "datasets", "big.npz", b"\0" * (UPLOAD_LIMIT + 1))
    assert response.status_code == 413
    assert str(UPLOAD_LIMIT) in response.json()["detail"]


def test_upload_above_the_limit_without_content_length_is_413(
    client: TestClient, acme: dict[str, str]
) -> None:
    """A chunked body is cut off as it streams, not after it was read whole."""
    boundary = "bitplan-test-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.npz"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()

    def chunks() -> Iterator[bytes]:
        yield head
        for _ in range(UPLOAD_LIMIT // 4096 + 2):
            yield b"\0" * 4096
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post(
        "/v1/datasets",
        headers={**acme, "Content-Type": f"multipart/form-data; boundary={boundary}"},
        content=chunks(),
    )
    assert response.status_code == 413


class _Marker:
    """A pickle that would create a file when unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def test_a_pickle_that_runs_code_is_refused_and_nothing_runs(
    client: TestClient, acme: dict[str, str], tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    for name, data in (
        ("evil.pt", _torch_saved({"weight": _Marker(marker)})),
        ("evil.pkl.pt", pickle.dumps({"weight": _Marker(marker)})),
    ):
        response = upload(client, acme, "models", name, data)
        assert response.status_code == 415, response.text
        assert response.json()["error"] == "UnsafeWeights"
        assert "safetensors" in response.json()["detail"]
    assert not marker.exists()


def _torch_saved(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_corrupt_safetensors_is_422(client: TestClient, acme: dict[str, str]) -> None:
    data = save({"weight": torch.ones(64)})
    response = upload(client, acme, "models", "cut.safetensors", data[: len(data) // 2])
    assert response.status_code == 422
    assert "not a readable .safetensors file" in response.json()["detail"]


def test_unknown_file_types_and_bad_datasets_are_refused(
    client: TestClient, acme: dict[str, str]
) -> None:
    assert upload(client, acme, "models", "weights.exe", b"MZ").status_code == 415
    assert upload(client, acme, "datasets", "data.parquet", b"PAR1").status_code == 415
    bad = io.BytesIO()
    np.savez(bad, pixels=np.zeros((2, 4)))
    response = upload(client, acme, "datasets", "calib.npz", bad.getvalue())
    assert response.status_code == 422
    assert "images" in response.json()["detail"]
    response = client.post("/v1/models", headers=acme, json={"file": "x"})
    assert response.status_code == 415


# --- jobs ----------------------------------------------------------------------------------------


def test_submit_answers_202_with_location(
    client: TestClient, acme: dict[str, str], calib_ref: str
) -> None:
    response = client.post("/v1/jobs", headers=acme, json=job_body(calib_ref, budget="avg-bits=3"))
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued"
    assert job["queue"] == "interactive"
    assert (
        job["spec"]
        == JobSpec(model="zoo:cifar_resnet20", calib=calib_ref, budget="avg-bits=3").to_dict()
    )
    detail = client.get(response.headers["Location"], headers=acme).json()
    assert {"phase", "progress", "attempts", "error", "timings", "started_at"} <= set(detail)


def test_idempotency_key_returns_the_first_job(
    client: TestClient, acme: dict[str, str], calib_ref: str
) -> None:
    headers = {**acme, "Idempotency-Key": "nightly-42"}
    first = client.post("/v1/jobs", headers=headers, json=job_body(calib_ref))
    again = client.post("/v1/jobs", headers=headers, json=job_body(calib_ref))
    assert (first.status_code, again.status_code) == (202, 200)
    assert first.json()["id"] == again.json()["id"]
    changed = client.post(
        "/v1/jobs", headers=headers, json=job_body(calib_ref, budget="avg-bits=3")
    )
    assert changed.status_code == 409
    assert "different" in changed.json()["detail"]
    moved = client.post("/v1/jobs", headers=headers, json={**job_body(calib_ref), "priority": 5})
    assert moved.status_code == 409
    assert len(client.get("/v1/jobs", headers=acme).json()["jobs"]) == 1


def test_listing_pages_by_cursor_and_filters_by_status(
    client: TestClient, acme: dict[str, str], calib_ref: str
) -> None:
    ids = [
        client.post("/v1/jobs", headers=acme, json=job_body(calib_ref)).json()["id"]
        for _ in range(5)
    ]
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=acme)
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/jobs", headers=acme, params=params).json()
        seen += [job["id"] for job in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    cancelled = client.get("/v1/jobs", headers=acme, params={"status": "cancelled"}).json()
    assert [job["id"] for job in cancelled["jobs"]] == [ids[0]]
    assert client.get("/v1/jobs", headers=acme, params={"cursor": "garbage"}).status_code == 400
    assert client.get("/v1/jobs", headers=acme, params={"status": "done"}).status_code == 422


def test_cancel_a_queued_job(client: TestClient, acme: dict[str, str], calib_ref: str) -> None:
    job = client.post("/v1/jobs", headers=acme, json=job_body(calib_ref)).json()
    response = client.post(f"/v1/jobs/{job['id']}/cancel", headers=acme)
    assert response.status_code == 202
    assert response.json()["status"] == "cancelled"
    result = client.get(f"/v1/jobs/{job['id']}/result", headers=acme)
    assert result.status_code == 409
    assert "cancelled" in result.json()["detail"]
    assert client.get(f"/v1/jobs/{job['id']}/artifacts", headers=acme).json() == []


def test_a_bad_budget_is_422_saying_what_to_write(
    client: TestClient, acme: dict[str, str], calib_ref: str
) -> None:
    response = client.post("/v1/jobs", headers=acme, json=job_body(calib_ref, budget="avg-bitz=4"))
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "BadBudget"
    assert "avg-bits=4" in body["detail"] and "size-mb=" in body["detail"]
    method = client.post("/v1/jobs", headers=acme, json=job_body(calib_ref, method="vibes"))
    assert method.status_code == 422 and "lrp" in method.json()["detail"]
    model = client.post("/v1/jobs", headers=acme, json=job_body(calib_ref, model="nope:x"))
    assert model.status_code == 422 and "zoo" in model.json()["detail"]
    typo = client.post("/v1/jobs", headers=acme, json={"spec": {"model": "zoo:x", "calibb": "y"}})
    assert typo.status_code == 422


def test_server_paths_need_an_allowed_root(
    client: TestClient, acme: dict[str, str], settings: Settings, tmp_path: Path
) -> None:
    outside = tmp_path / "calib.npz"
    outside.write_bytes(npz_bytes())
    response = client.post("/v1/jobs", headers=acme, json=job_body(str(outside)))
    assert response.status_code == 422
    assert "allowed roots" in response.json()["detail"]
    settings.workers = replace(settings.workers, allowed_input_roots=(tmp_path,))
    assert client.post("/v1/jobs", headers=acme, json=job_body(str(outside))).status_code == 202

    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "escape.npz").symlink_to(outside)
    settings.workers = replace(settings.workers, allowed_input_roots=(allowed,))
    for escape in (allowed / ".." / "calib.npz", allowed / "escape.npz"):
        response = client.post("/v1/jobs", headers=acme, json=job_body(str(escape)))
        assert response.status_code == 422, escape
        assert "allowed roots" in response.json()["detail"]


def _layer(name: str, params: int, pinned: int | None = None) -> dict[str, Any]:
    return asdict(
        Layer(
            name=name,
            kind="linear",
            params=params,
            out_channels=4,
            macs=params,
            group=name,
            pinned_bits=pinned,
        )
    )


COST_TABLE = {
    "method": "fisher",
    "bits": [2, 4, 8],
    "layers": [_layer("stem", 100, pinned=8), _layer("body", 4000), _layer("head", 400)],
    "attention_macs": 0,
    "cost": [[0.0, 0.0, 0.0], [9.0, 2.0, 0.1], [5.0, 1.0, 0.2]],
}


def _profile(client: TestClient, tenant: str, key: ProfileKey | None = None) -> str:
    key = key or ProfileKey("a" * 64, "b" * 64, "fisher", "c" * 64)
    with client.app.state.session_factory() as session:
        return repositories.put_profile(session, tenant=tenant, key=key, cost_table=COST_TABLE).id


def test_an_infeasible_budget_is_422_naming_the_smallest_size(
    client: TestClient, acme: dict[str, str], calib_ref: str
) -> None:
    """With a cost table cached for the same inputs, the budget is checked before queueing."""
    spec = JobSpec(model="zoo:cifar_resnet20", calib=calib_ref, method="fisher", budget="x")
    with client.app.state.session_factory() as session:
        upload = repositories.get_upload(
            session, tenant="acme", upload_id=calib_ref.removeprefix("upload:")
        )
    _profile(client, "acme", profile_key(spec, None, upload.sha256))
    response = client.post(
        "/v1/jobs", headers=acme, json=job_body(calib_ref, method="fisher", budget="avg-bits=1.5")
    )
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "InfeasibleBudget"
    assert "smallest feasible size" in body["detail"]
    assert body["smallest_feasible_bits"] == 100 * 8 + 4400 * 2 + 3 * 4 * 16
    feasible = job_body(calib_ref, method="fisher", budget="avg-bits=4")
    assert client.post("/v1/jobs", headers=acme, json=feasible).status_code == 202


# --- profiles ------------------------------------------------------------------------------------


def test_profile_resolves_a_new_budget_without_a_model(
    client: TestClient, acme: dict[str, str], globex: dict[str, str]
) -> None:
    profile_id = _profile(client, "acme")
    info = client.get(f"/v1/profiles/{profile_id}", headers=acme).json()
    assert (info["layers"], info["bits"], info["method"]) == (3, [2, 4, 8], "fisher")
    answer = client.post(
        f"/v1/profiles/{profile_id}/solve", headers=acme, json={"budget": "avg-bits=4"}
    )
    assert answer.status_code == 200, answer.text
    plan = {entry["layer"]: entry["weight_bits"] for entry in answer.json()["allocation"]}
    assert plan["stem"] == 8
    assert answer.json()["solver"]["status"] == "optimal"
    assert answer.json()["avg_weight_bits"] <= 4.2
    tight = client.post(
        f"/v1/profiles/{profile_id}/solve", headers=acme, json={"budget": "avg-bits=1"}
    )
    assert tight.status_code == 422 and "smallest feasible" in tight.json()["detail"]
    other = client.post(
        f"/v1/profiles/{profile_id}/solve", headers=globex, json={"budget": "avg-bits=4"}
    )
    assert other.status_code == 404


def test_profile_pareto_sweeps_budgets_in_order(client: TestClient, acme: dict[str, str]) -> None:
    profile_id = _profile(client, "acme")
    budgets = ["avg-bits=3", "avg-bits=5", "avg-bits=8"]
    response = client.post(
        f"/v1/profiles/{profile_id}/pareto", headers=acme, json={"budgets": budgets}
    )
    assert response.status_code == 200, response.text
    points = response.json()["points"]
    assert [point["budget"] for point in points] == budgets
    objectives = [point["solver"]["objective"] for point in points]
    assert objectives == sorted(objectives, reverse=True)


# --- sweeps --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_sweep_queues_every_model_at_every_budget(
    client: TestClient, acme: dict[str, str], calib_ref: str
) -> None:
    body = {
        "spec": {"model": "zoo:cifar_resnet20", "calib": calib_ref},
        "models": [{"model": "zoo:cifar_resnet20"}, {"model": "zoo:cifar_resnet56"}],
        "budgets": ["avg-bits=3", "avg-bits=4"],
        "not_before": LATER,
    }
    headers = {**acme, "Idempotency-Key": "sweep-1"}
    response = client.post("/v1/sweeps", headers=headers, json=body)
    assert response.status_code == 202, response.text
    jobs = response.json()["jobs"]
    assert {(job["spec"]["model"], job["spec"]["budget"]) for job in jobs} == {
        (model, budget)
        for model in ("zoo:cifar_resnet20", "zoo:cifar_resnet56")
        for budget in ("avg-bits=3", "avg-bits=4")
    }
    assert {job["queue"] for job in jobs} == {"batch"}
    again = client.post("/v1/sweeps", headers=headers, json=body)
    assert again.status_code == 200
    assert [job["id"] for job in again.json()["jobs"]] == [job["id"] for job in jobs]
    bad = client.post("/v1/sweeps", headers=acme, json={**body, "budgets": ["avg-bits=3", "?"]})
    assert bad.status_code == 422
    assert len(client.get("/v1/jobs", headers=acme).json()["jobs"]) == 4


# --- health, metrics, limits, schema -------------------------------------------------------------


def test_health_readiness_and_metrics(client: TestClient, acme: dict[str, str]) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok"}
    client.get(f"/v1/jobs/{uuid.uuid4()}", headers=acme)
    metrics = client.get("/metrics", headers=acme)
    assert metrics.headers["content-type"].startswith("text/plain")
    assert (
        'bitplan_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"} 1.0'
        in metrics.text
    )


def test_readiness_checks_the_broker_when_celery_runs_jobs(settings: Settings) -> None:
    broker = "redis://127.0.0.1:6379/15"
    try:
        redis.Redis.from_url(broker, socket_connect_timeout=2).ping()
    except redis.RedisError as error:
        pytest.skip(f"Redis unreachable at {broker}: {error}")
    settings.workers = WorkerSettings(executor=ExecutorKind.CELERY, broker_url=broker)
    with TestClient(create_app(settings)) as test_client:
        response = test_client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["checks"] == {"database": "ok", "broker": "ok"}


def test_readiness_reports_an_unreachable_broker(settings: Settings) -> None:
    settings.workers = WorkerSettings(
        executor=ExecutorKind.CELERY, broker_url="redis://127.0.0.1:1/0"
    )
    with TestClient(create_app(settings)) as test_client:
        response = test_client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["database"] == "ok"
    assert "Connection" in response.json()["checks"]["broker"]


def test_a_json_body_above_the_limit_is_413(client: TestClient, acme: dict[str, str]) -> None:
    body = {"spec": {"model": "zoo:x", "calib": "y" * 20_000}}
    assert client.post("/v1/jobs", headers=acme, json=body).status_code == 413


def test_openapi_documents_every_route_with_examples(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    schemes = schema["components"]["securitySchemes"].values()
    assert [scheme["scheme"] for scheme in schemes] == ["bearer"]
    assert "examples" in schema["components"]["schemas"]["JobRequest"]
    upload = schema["paths"]["/v1/models"]["post"]
    assert "multipart/form-data" in upload["requestBody"]["content"]
    assert {"413", "415", "422"} <= set(upload["responses"])
    result = schema["paths"]["/v1/jobs/{job_id}/result"]["get"]["responses"]["200"]
    assert "example" in result["content"]["application/json"]


def test_the_dashboard_shell_is_served_without_a_key_and_its_data_is_not(
    client: TestClient,
) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert '<script src="/dashboard.js"' in page.text
    script = client.get("/dashboard.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "Authorization: `Bearer ${" in script.text
    assert client.get("/v1/jobs").status_code == 401
    assert "/" not in client.get("/openapi.json").json()["paths"]
