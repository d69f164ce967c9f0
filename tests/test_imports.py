"""What the client side may import: `service.client`, `service.schemas` and the CLI's remote
commands (`submit`, `status`, `wait`) run without loading torch or SQLAlchemy.

An ML platform imports the client to submit jobs; it should not need a GPU stack or a database
driver for that, and `bitplan status` should answer in a fraction of a second. Each check runs in
a fresh interpreter, because this test process has long since imported both.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import allocator.job as job

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "sqlalchemy")

CLI_SCRIPT = r"""
import json, sys, tempfile
from pathlib import Path

import httpx
from typer.testing import CliRunner

import service.cli as cli
import service.cli.remote as remote_commands
from service.client import BitplanClient

JOB_ID = "5f0c2a0e-4d7b-4c36-9b57-1c2b8c7f9e11"
UPLOAD_ID = "0b8e3a54-6f1e-4b8e-8a51-3c0f3c9d2f10"
JOB = {
    "id": JOB_ID, "status": "succeeded", "phase": None, "progress": 1.0,
    "queue": "interactive", "priority": 0, "not_before": None, "attempts": 1,
    "max_attempts": 3, "cancel_requested": False, "error": None,
    "created_at": "2025-01-01T21:00:00Z", "started_at": "2025-01-01T21:00:01Z",
    "finished_at": "2025-01-01T21:00:09Z", "timings": {}, "spec": {}, "callback_url": None,
}
UPLOAD = {
    "id": UPLOAD_ID, "ref": "upload:" + UPLOAD_ID, "kind": "dataset", "sha256": "0" * 64,
    "size": 4, "filename": "calib.npz", "created_at": "2025-01-01T21:00:00Z",
}
RESULT = {
    "job_id": JOB_ID, "model": "zoo:cifar_resnet20", "budget": "avg-bits=4",
    "avg_weight_bits": 4.0, "weight_bytes": 1000.0,
    "solver": {"name": "highs", "status": "optimal"},
    "metrics": {
        "primary": "kl", "fp32": {"kl": 0.0}, "quantized": {"kl": 0.1},
        "uniform": {"bits": 4, "kl": 0.2},
    },
    "artifacts": {},
}
submitted = []


def answer(request):
    path = request.url.path
    if path == "/v1/datasets":
        return httpx.Response(201, json=UPLOAD)
    if path == "/v1/jobs":
        submitted.append(json.loads(request.content)["spec"])
        return httpx.Response(201, json={**JOB, "status": "queued", "progress": 0.0})
    if path.endswith("/result"):
        return httpx.Response(200, json=RESULT)
    return httpx.Response(200, json=JOB)


remote_commands._client = lambda server, key: BitplanClient(server, key, transport=httpx.MockTransport(answer))
calib = Path(tempfile.mkdtemp()) / "calib.npz"
calib.write_bytes(b"data")
remote = ["--server", "http://bitplan.test", "--key", "bp_test"]
commands = {
    "status --help": ["status", "--help"],
    "submit": ["submit", "--model", "zoo:cifar_resnet20", "--calib", str(calib), *remote],
    "status": ["status", JOB_ID, *remote],
    "wait": ["wait", JOB_ID, "--poll", "0", *remote],
}
runs = {}
for name, args in commands.items():
    outcome = CliRunner().invoke(cli.app, args)
    runs[name] = {"exit": outcome.exit_code, "output": outcome.output}
print(json.dumps({
    "runs": runs,
    "submitted": submitted,
    "loaded": [name for name in HEAVY if name in sys.modules],
}))
"""


def _fresh(script: str) -> dict:
    """Run `script` in a new interpreter with `HEAVY` defined; the JSON object it prints."""
    done = subprocess.run(
        [sys.executable, "-c", f"HEAVY = {HEAVY!r}\n{script}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_client_and_schemas_load_neither_torch_nor_sqlalchemy() -> None:
    found = _fresh(
        "import json, sys\n"
        "import allocator.job, allocator.job_metrics, service.client, service.schemas, service.cli\n"
        "print(json.dumps({'loaded': [name for name in HEAVY if name in sys.modules]}))"
    )
    assert found["loaded"] == []


def test_cli_submit_status_and_wait_load_neither_torch_nor_sqlalchemy() -> None:
    found = _fresh(CLI_SCRIPT)
    runs = found["runs"]
    assert all(run["exit"] == 0 for run in runs.values()), runs
    assert "A job's status" in runs["status --help"]["output"]
    assert runs["submit"]["output"].strip() == "5f0c2a0e-4d7b-4c36-9b57-1c2b8c7f9e11"
    assert found["submitted"][0]["calib"] == "upload:0b8e3a54-6f1e-4b8e-8a51-3c0f3c9d2f10"
    assert "succeeded" in runs["status"]["output"]
    assert "kl (lower is better)" in runs["wait"]["output"]
    assert found["loaded"] == []


def test_every_name_a_spec_may_use_has_an_implementation() -> None:
    """`allocator.job` lists them without importing the torch modules that implement them."""
    from allocator.activation_bench import AUTO, PRESETS
    from allocator.sensitivity import METHODS

    assert (*PRESETS, AUTO) == job.ACT_QUANTIZERS
    assert tuple(METHODS) == job.SENSITIVITY_METHODS


def test_the_pipeline_still_names_the_job_types() -> None:
    import allocator.pipeline as pipeline

    assert pipeline.JobSpec is job.JobSpec
    assert pipeline.Result is job.Result
