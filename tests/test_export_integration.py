"""The ONNX export through the real HTTP API: `bitplan serve` as its own process on PostgreSQL,
a ResNet20 job submitted, then `GET /v1/jobs/{id}/artifacts/onnx`
(through `bitplan export --server`) exports it on request, checks it in ONNX Runtime and
records the figures in the result; another tenant cannot export it, and a job that does not
exist is a 404 naming no server path."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from allocator.export.onnx_qdq import read_metadata
from bench.deploy import bitplan, serving
from service.client import ApiError, BitplanClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]
JOB_SECONDS = 600


@pytest.fixture
def env(postgres_url: str, tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "BITPLAN_HOME": str(tmp_path / "home"),
        "BITPLAN_DATABASE_URL": postgres_url,
        "BITPLAN_EXECUTOR": "inline",
    }


@pytest.fixture
def server(env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    with serving(env, tmp_path / "serve.log") as url:
        yield url


def test_a_finished_job_is_exported_on_request_over_http(
    server: str, env: dict[str, str], resnet20_inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    weights, images = resnet20_inputs
    key = bitplan("keys", "create", "--tenant", "export-owner", env=env).strip()
    other = bitplan("keys", "create", "--tenant", "export-other", env=env).strip()
    remote = {**env, "BITPLAN_SERVER": server, "BITPLAN_API_KEY": key}
    job_id = bitplan(
        "submit", "--model", "zoo:cifar_resnet20", "--weights", str(weights), "--calib",
        str(images), "--eval", str(images), "--calib-samples", "32", "--batch-size", "16",
        "--method", "fisher", "--budget", "avg-bits=4", "--calibration", "fp32",
        "--context-rounds", "0", "--no-report-widths", "--no-report",
        env=remote,
    ).strip()  # fmt: skip
    result = json.loads(bitplan("wait", job_id, "--json", env=remote, timeout=JOB_SECONDS))
    assert "onnx" not in result["artifacts"] and not result["metrics"]["exports"]

    with BitplanClient(server, other) as client, pytest.raises(ApiError) as refused:
        client.export(job_id, tmp_path / "stolen.onnx")
    assert refused.value.status == 404 and not (tmp_path / "stolen.onnx").exists()

    target = tmp_path / "model.onnx"
    out = bitplan("export", job_id, "--format", "onnx", "-o", str(target), env=remote, timeout=600)
    assert out.splitlines()[0] == str(target)
    metadata = read_metadata(target)
    assert metadata["bitplan.job_id"] == job_id
    plan = json.loads(metadata["bitplan.plan"])
    assert set(json.loads(metadata["bitplan.weights"])) == set(plan["layers"])
    ops = [node.op_type for node in onnx.load(str(target)).graph.node]
    assert ops.count("DequantizeLinear") == len(plan["layers"])
    runtime = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    (logits,) = runtime.run(None, {"input": np.zeros((2, 3, 32, 32), np.float32)})
    assert logits.shape == (2, 10)

    with BitplanClient(server, key) as client:
        stored = client.result(job_id)
        with pytest.raises(ApiError) as missing:
            client.export("00000000-0000-0000-0000-000000000000", tmp_path / "none.onnx")
    check = stored["metrics"]["exports"]["onnx"]
    assert check["passed"] and check["samples"] == 48
    assert abs(check["runtime_metric"] - check["bitplan_metric"]) <= check["metric_tolerance"]
    assert stored["artifacts"]["onnx"] == f"/v1/jobs/{job_id}/artifacts/onnx"
    assert missing.value.status == 404
    assert env["BITPLAN_HOME"] not in missing.value.detail + json.dumps(stored)
