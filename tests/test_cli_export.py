"""`bitplan export JOB --format onnx` on the embedded default: a finished job's model exported
and checked in ONNX Runtime, recorded once, and bad input refused in one line (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from allocator.export.onnx_qdq import read_metadata
from service.cli import app

pytestmark = pytest.mark.slow  # runs a (small) ResNet20 job


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def job(resnet20_inputs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    """A BITPLAN_HOME with one finished weight-only ResNet20 job that did not export."""
    weights, images = resnet20_inputs
    home = tmp_path_factory.mktemp("home") / "data"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BITPLAN_HOME", str(home))
        patch.delenv("BITPLAN_DATABASE_URL", raising=False)
        code, out, err = invoke(
            "run", "--model", "zoo:cifar_resnet20", "--weights", str(weights), "--calib",
            str(images), "--eval", str(images), "--calib-samples", "32", "--batch-size", "16",
            "--method", "fisher", "--budget", "avg-bits=4", "--calibration", "fp32",
            "--context-rounds", "0", "--no-report-widths", "--no-report", "--json",
        )  # fmt: skip
    assert code == 0, err
    return home, json.loads(out)["job_id"]


def test_export_writes_a_checked_onnx_model_once(job, tmp_path: Path, monkeypatch) -> None:
    home, job_id = job
    monkeypatch.setenv("BITPLAN_HOME", str(home))
    target = tmp_path / "resnet20.onnx"

    code, out, err = invoke("export", job_id, "--format", "onnx", "-o", str(target))

    assert code == 0, err
    path, summary = out.strip().splitlines()
    assert path == str(target)
    assert summary.startswith("onnx: max abs diff ") and "top1" in summary
    metadata = read_metadata(target)
    assert metadata["bitplan.job_id"] == job_id
    assert json.loads(metadata["bitplan.plan"])["layers"]
    runtime = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    (logits,) = runtime.run(None, {"input": np.zeros((3, 3, 32, 32), np.float32)})
    assert logits.shape == (3, 10)

    again = tmp_path / "again.onnx"
    code, out, err = invoke("export", job_id, "-o", str(again))
    assert code == 0, err
    assert again.read_bytes() == target.read_bytes(), "the stored export is served, not redone"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["00000000-0000-0000-0000-000000000000"], "error: no job 00000000-0000"),
        (["JOB", "--format", "tflite"], "export format 'tflite' is not one of onnx"),
    ],
)
def test_export_refuses_bad_input_in_one_line(job, args, message, monkeypatch) -> None:
    home, job_id = job
    monkeypatch.setenv("BITPLAN_HOME", str(home))
    code, out, err = invoke("export", *[job_id if a == "JOB" else a for a in args])
    assert code == 2
    assert out == ""
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
