"""Every spec field and model-reference option is bounded before anything is stored or queued.

Each request here was accepted (202) before: a tenant could queue widths of 1000 bits, a NaN
time limit (a 500 on PostgreSQL), 10^12 samples, a timm option that opens a server file, or a
model too big for any worker. Now each is a 422 whose message names the field and the bound,
and no job row is written.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from allocator.errors import BadSpec
from allocator.job import JobSpec
from allocator.limits import Limits
from allocator.memory import JobTooLarge, estimate, image_sample
from allocator.zoo import load_model, meta_model
from db.models import Job
from tests.api_app import job_body

HOSTILE_SPECS: list[tuple[dict[str, Any], str]] = [
    ({"bits": [1000]}, "weight width 1000 is not one of"),
    ({"bits": [0, -1]}, "weight width 0 is not one of"),
    ({"bits": []}, "lists no width"),
    ({"bits": [4, 4]}, "lists a width twice"),
    ({"time_limit": -1}, "time_limit -1"),
    ({"time_limit": 1e308}, "time_limit 1e+308"),
    ({"eval_samples": -5}, "eval_samples -5 is outside 1..1000000"),
    ({"pins": {"conv1": 99999}}, "pin conv1: weight width 99999"),
    ({"batch_size": 10**12}, "batch_size 1000000000000 is outside 1..1024"),
    ({"calib_samples": 10**12}, "calib_samples 1000000000000 is outside 1..50000"),
    ({"seed": -1}, "seed -1 is outside"),
    ({"budget": "avg-bits=" + "9" * 300}, "budget is longer than 200"),
    ({"model": "timm:resnet18?checkpoint_path=/etc/hostname"}, "'checkpoint_path' is not"),
    ({"model": "timm:resnet18?pretrained_cfg_overlay=x"}, "'pretrained_cfg_overlay' is not"),
    ({"model": "timm:vit_tiny_patch16_224?img_size=100000"}, "img_size=100000 is outside"),
    ({"model": "timm:resnet18?num_classes=1000000000"}, "num_classes=1000000000 is outside"),
    ({"model": "timm:resnet181"}, "did you mean resnet18"),
    ({"model": "zoo:cifar_resnet21"}, "cifar_resnet20"),
    ({"model": "hf:/etc"}, "outside the allowed roots"),
    (
        {"model": "timm:vit_large_patch16_224", "batch_size": 1024},
        "BITPLAN_MAX_JOB_MEMORY",
    ),
]


def _jobs(client: TestClient) -> int:
    with client.app.state.session_factory() as session:
        return session.scalar(select(func.count()).select_from(Job))


@pytest.mark.parametrize(("fields", "expected"), HOSTILE_SPECS)
def test_hostile_specs_are_422_and_nothing_is_queued(
    client: TestClient,
    acme: dict[str, str],
    calib_ref: str,
    fields: dict[str, Any],
    expected: str,
) -> None:
    response = client.post("/v1/jobs", headers=acme, json=job_body(calib_ref, **fields))
    assert response.status_code == 422, response.text
    assert expected in response.json()["detail"]
    assert "Traceback" not in response.text
    assert _jobs(client) == 0


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_422(
    client: TestClient, acme: dict[str, str], calib_ref: str, number: str
) -> None:
    """Python's JSON reads NaN and Infinity; PostgreSQL's JSONB cannot store them."""
    body = json.dumps(job_body(calib_ref, time_limit="NUMBER")).replace('"NUMBER"', number)
    response = client.post(
        "/v1/jobs", headers={**acme, "Content-Type": "application/json"}, content=body
    )
    assert response.status_code == 422, response.text
    assert _jobs(client) == 0


def test_a_reasonable_spec_is_still_accepted(
    client: TestClient, acme: dict[str, str], calib_ref: str
) -> None:
    body = job_body(
        calib_ref,
        model="timm:resnet18?num_classes=10&drop_rate=0.1",
        bits=[2, 4, 8, 16],
        pins={"fc": 8},
        time_limit=30,
    )
    assert client.post("/v1/jobs", headers=acme, json=body).status_code == 202


def test_the_operator_limits_bound_the_spec() -> None:
    spec = JobSpec(model="zoo:cifar_resnet20", calib="x", calib_samples=300)
    spec.validate()
    with pytest.raises(BadSpec, match=r"calib_samples 300 is outside 1\.\.256"):
        spec.validate(Limits(max_calib_samples=256))
    with pytest.raises(BadSpec, match="time_limit nan"):
        JobSpec(model="m", calib="x", time_limit=math.nan).validate()


def test_the_memory_estimate_needs_no_storage_and_matches_the_loaded_model() -> None:
    """At submit the model is built on the meta device; the worker's estimate on the loaded
    model must agree, so what the API lets through a worker does not refuse."""
    meta = meta_model("zoo:cifar_resnet20")
    real = load_model("zoo:cifar_resnet20")
    options = {"batch_size": 32, "samples": 256, "widths": 6}
    on_meta = estimate(meta, image_sample(meta), **options)
    on_real = estimate(real, image_sample(real), **options)
    assert on_meta == on_real
    assert on_meta.params == sum(p.numel() for p in real.module.parameters())
    on_meta.check(on_meta.total)
    with pytest.raises(JobTooLarge, match="lower batch_size or calib_samples"):
        on_meta.check(on_meta.total - 1)


@pytest.mark.parametrize(
    "fields",
    ['"model": NaN', '"pins": Infinity, "method": 1e400', '"bits": "' + "x" * 5000 + '"'],
)
def test_malformed_fields_are_422_without_echoing_the_input(
    client: TestClient, acme: dict[str, str], fields: str
) -> None:
    """FastAPI's own validation answer repeats each input: NaN or Infinity cannot be written
    back as JSON (a 500 and a dropped connection) and a long string comes back whole."""
    body = f'{{"spec": {{"model": "zoo:cifar_resnet20", "calib": "x", {fields}}}}}'
    response = client.post(
        "/v1/jobs", headers={**acme, "Content-Type": "application/json"}, content=body
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "InvalidRequest"
    assert "spec." in response.json()["detail"]
    assert len(response.text) < 1000
    assert _jobs(client) == 0
