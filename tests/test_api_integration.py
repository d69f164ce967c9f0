"""The embedded deployment end to end: `bitplan serve` as its own process on loopback, a CIFAR
ResNet20 job submitted with `bitplan submit` (which uploads the weights and data), `bitplan wait
--json`, the packed model downloaded with `bitplan fetch` and loaded with `load_packed`, and a
new budget re-solved from the job's profile over HTTP.

Needs the shared CIFAR-10 data and weights (`../shared/data`); skipped with the reason without.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from allocator.apply import load_packed
from allocator.zoo import load_model
from bench.deploy import bitplan, serving
from service.client import BitplanClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
WEIGHTS = CIFAR / "resnet20-12fca82f.th"
CALIB = CIFAR / "calib_train_jpeg.npz"
JOB_SECONDS = 900


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    if not (WEIGHTS.is_file() and CALIB.is_file()):
        pytest.skip(f"CIFAR-10 weights and data not found under {CIFAR}")
    return {**os.environ, "BITPLAN_HOME": str(tmp_path / "home"), "BITPLAN_EXECUTOR": "inline"}


@pytest.fixture
def server(env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    with serving(env, tmp_path / "serve.log") as url:
        yield url


def test_a_job_over_http_produces_a_loadable_packed_model(
    server: str, env: dict[str, str], tmp_path: Path
) -> None:
    key = bitplan("keys", "create", "--tenant", "integration", env=env).strip()
    remote = {**env, "BITPLAN_SERVER": server, "BITPLAN_API_KEY": key}
    job_id = bitplan(
        "submit",
        "--model",
        "zoo:cifar_resnet20",
        "--weights",
        str(WEIGHTS),
        "--calib",
        str(CALIB),
        "--calib-samples",
        "32",
        "--batch-size",
        "16",
        "--eval-samples",
        "64",
        "--bits",
        "2,4,8",
        "--method",
        "fisher",
        "--budget",
        "avg-bits=4",
        env=remote,
    ).strip()

    result = json.loads(bitplan("wait", job_id, "--json", env=remote, timeout=JOB_SECONDS))
    assert result["job_id"] == job_id
    assert result["model"] == "zoo:cifar_resnet20"
    assert result["avg_weight_bits"] <= 4.2
    assert result["solver"]["status"] in ("optimal", "feasible")
    assert result["artifacts"]["model"] == f"/v1/jobs/{job_id}/artifacts/model"
    assert env["BITPLAN_HOME"] not in json.dumps(result), "no server path in a result"

    packed = tmp_path / "resnet20-mixed.safetensors"
    bitplan("fetch", job_id, "model", "-o", str(packed), env=remote)
    module, plan = load_packed(packed, load_model("zoo:cifar_resnet20").module)
    planned = {entry["layer"]: entry["weight_bits"] for entry in result["allocation"]}
    assert plan.weight_bits == planned
    with torch.no_grad():
        logits = module.eval()(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()

    with BitplanClient(server, key) as client:
        tighter = client.solve_profile(result["profile_id"], "avg-bits=3")
    assert tighter.avg_weight_bits < result["avg_weight_bits"]
    assert {entry.layer for entry in tighter.allocation} == set(planned)
