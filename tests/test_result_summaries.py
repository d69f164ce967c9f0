"""What the CLI and the dashboard say about a finished job's comparison with uniform and about the
data it was evaluated on, from hand-made result payloads; and `--eval-on-calibration`, the
explicit way to evaluate on the calibration data."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from allocator.errors import BitplanError
from allocator.job import JobSpec, UploadKind
from allocator.job_metrics import EVAL_SOURCES
from service.cli.options import build_spec
from service.cli.output import print_summary
from service.cli.remote import _uploaded

ROOT = Path(__file__).resolve().parents[1]
COMPARISON = {
    "verdict": "no measurable difference",
    "primary": {"metric": "top1", "value": -0.53, "low": -1.2, "high": 0.1},
    "closeness": {"metric": "agreement", "value": 1.4, "low": 0.6, "high": 2.2},
    "samples": 500,
    "resamples": 2000,
    "confidence": 0.95,
}


def payload(**metrics: Any) -> dict[str, Any]:
    return {
        "job_id": "job-1",
        "model": "zoo:cifar_resnet20",
        "budget": "avg-bits=3",
        "avg_weight_bits": 3.02,
        "weight_bytes": 102692.0,
        "solver": {"name": "knapsack", "status": "optimal"},
        "metrics": {
            "primary": "top1",
            "fp32": {"top1": 81.03},
            "quantized": {"top1": 79.65},
            "uniform": {"bits": 3, "act_bits": None, "top1": 80.18},
            **metrics,
        },
        "artifacts": {},
    }


def test_the_cli_summary_gives_the_verdict_with_its_interval_and_the_eval_source(
    capsys: pytest.CaptureFixture[str],
) -> None:
    print_summary(payload(comparison=COMPARISON, eval_source="holdout"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == (
        "top1: fp32 81.03  mixed 79.65  uniform W3 80.18  "
        "(on held-out part of the calibration data)"
    )
    assert lines[3] == (
        "mixed vs uniform W3: no measurable difference: top1 -0.53 [-1.20, +0.10], agreement "
        "with FP32 +1.40 [+0.60, +2.20] (95% paired bootstrap intervals over 500 samples)"
    )


def test_the_cli_summary_of_an_older_result_claims_neither(
    capsys: pytest.CaptureFixture[str],
) -> None:
    print_summary(payload())
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "top1: fp32 81.03  mixed 79.65  uniform W3 80.18"
    assert len(lines) == 3


def dashboard_summary(result: dict[str, Any]) -> str:
    """dashboard.js's `summary` run by node, with the browser globals it touches stubbed."""
    script = (
        "const fs = require('fs'), vm = require('vm');"
        "const context = vm.createContext({document: {addEventListener() {}},"
        " localStorage: {getItem() { return null; }}});"
        "vm.runInContext(fs.readFileSync(process.argv[1], 'utf8'), context);"
        "context.result = JSON.parse(process.argv[2]);"
        "console.log(JSON.stringify([vm.runInContext('summary(result)', context),"
        " vm.runInContext('EVAL_SOURCES', context)]));"
    )
    done = subprocess.run(
        ["node", "-e", script, str(ROOT / "service/static/dashboard.js"), json.dumps(result)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    text, sources = json.loads(done.stdout)
    assert sources == EVAL_SOURCES  # the page names each source as the Python side does
    return text


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_dashboard_row_gives_the_verdict_and_the_eval_source() -> None:
    shown = dashboard_summary(payload(comparison=COMPARISON, eval_source="calibration"))
    assert shown == (
        "3.020 bits · top1 fp32 81.03 → mixed 79.65 · vs uniform W3: no measurable difference "
        "(top1 -0.53 [-1.20, +0.10]) · evaluated on the calibration data (explicit)"
    )
    assert dashboard_summary(payload()) == "3.020 bits · top1 fp32 81.03 → mixed 79.65"


def test_eval_on_calibration_names_the_calibration_file_for_evaluation(tmp_path: Path) -> None:
    calib = tmp_path / "calib.npz"
    spec = build_spec(model="zoo:cifar_resnet20", calib=str(calib), eval_on_calibration=True)
    assert spec.eval == spec.calib == str(calib)
    assert build_spec(model="zoo:cifar_resnet20", calib=str(calib)).eval is None
    with pytest.raises(BitplanError, match="drop it or drop --eval"):
        build_spec(model="zoo:x", calib=str(calib), eval="test.npz", eval_on_calibration=True)


class Uploads:
    """A client that counts uploads and answers each with a new ref."""

    def __init__(self) -> None:
        self.sent: list[tuple[UploadKind, str]] = []

    def upload(self, kind: UploadKind, path: str) -> Any:
        self.sent.append((kind, path))
        return type("Upload", (), {"ref": f"upload:{len(self.sent)}"})()


def test_a_file_named_as_calibration_and_evaluation_data_is_uploaded_once(tmp_path: Path) -> None:
    calib = tmp_path / "calib.npz"
    calib.write_bytes(b"images")
    client = Uploads()
    spec = _uploaded(client, JobSpec(model="zoo:x", calib=str(calib), eval=str(calib)))
    assert spec.calib == spec.eval == "upload:1" and len(client.sent) == 1
