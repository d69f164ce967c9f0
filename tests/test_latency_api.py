"""`/v1/latency-tables` on the embedded default (the inline executor measures in a thread):
request, poll, the table a tenant owns; refusals in 4xx; jobs and profile re-solves with a
latency budget refused without a table of the tenant's; the client's calls."""

from __future__ import annotations

import time
from typing import Any

from fastapi.testclient import TestClient

from service.client import ApiError, BitplanClient
from tests.api_app import job_body

# A served app and a key of it, as the client tests use them.
from tests.test_client import home, key, server  # noqa: F401

REQUEST = {
    "model": "zoo:cifar_resnet20",
    "input_shape": "1,3,32,32",
    "bits": [4, 8],
    "act_bits": [8],
    "warmup": 1,
    "repeats": 3,
}


def wait(client: TestClient, headers: dict[str, str], table_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        body = client.get(f"/v1/latency-tables/{table_id}", headers=headers).json()
        if body["status"] not in ("queued", "running"):
            return body
        time.sleep(0.2)
    raise AssertionError(f"latency table {table_id} not measured in time")


def test_request_poll_and_own(client: TestClient, acme: dict, globex: dict) -> None:
    response = client.post("/v1/latency-tables", headers=acme, json=REQUEST)
    assert response.status_code == 202, response.text
    table_id = response.json()["id"]
    assert response.headers["Location"] == f"/v1/latency-tables/{table_id}"
    done = wait(client, acme, table_id)
    assert done["status"] == "succeeded", done
    assert done["table"]["runtime"] == "onnxruntime-cpu" and "conv1" in done["table"]["entries"]
    assert done["machine_sha256"] and done["model_sha256"]
    assert client.get(f"/v1/latency-tables/{table_id}", headers=globex).status_code == 404
    listed = client.get("/v1/latency-tables", headers=acme).json()
    assert [row["id"] for row in listed] == [table_id]
    # A job of another tenant cannot name it; a job of its own can.
    spec = {"budget": "latency=0.9x", "latency_table": table_id}
    other = client.post("/v1/jobs", headers=globex, json=job_body("upload:" + "0" * 36, **spec))
    assert other.status_code == 422
    own = client.post("/v1/datasets", headers=acme, files={"file": ("c.npz", _npz())})
    job = client.post("/v1/jobs", headers=acme, json=job_body(own.json()["ref"], **spec))
    assert job.status_code == 202, job.text


def test_refusals(client: TestClient, acme: dict, calib_ref: str) -> None:
    for change, words in (
        ({"queue": "gpu"}, "is not one of latency"),
        ({"runtime": "tvm"}, "not one of"),
        ({"input_shape": "1,0"}, "positive dimensions"),
        ({"weights": "/etc/passwd"}, "outside the allowed roots"),
        ({"bits": [9]}, "bits must be among"),
    ):
        response = client.post("/v1/latency-tables", headers=acme, json={**REQUEST, **change})
        assert response.status_code == 422, (change, response.text)
        assert words in response.json()["detail"], response.json()
    missing = client.post("/v1/jobs", headers=acme, json=job_body(calib_ref, budget="latency=0.5x"))
    assert missing.status_code == 422 and "needs a latency table" in missing.json()["detail"]
    unknown = client.post(
        "/v1/jobs",
        headers=acme,
        json=job_body(calib_ref, budget="latency=0.5x", latency_table="1" * 8 + "-" + "1" * 27),
    )
    assert unknown.status_code == 422
    assert "not a measured latency table of yours" in unknown.json()["detail"]


def test_client_calls(server: Any, key: str) -> None:  # noqa: F811
    with BitplanClient(server.url, key) as api:
        asked = api.request_latency_table(REQUEST)
        assert asked.status in ("queued", "running", "succeeded")
        done = api.wait_latency_table(asked.id, poll=0.2, timeout=120)
        assert done.status == "succeeded" and done.table is not None
        assert [row.id for row in api.latency_tables()] == [asked.id]
        try:
            api.request_latency_table(REQUEST, queue="batch")
        except ApiError as error:
            assert error.status == 422
        else:
            raise AssertionError("a job queue is not a latency queue")


def _npz() -> bytes:
    from tests.api_app import npz_bytes

    return npz_bytes()
