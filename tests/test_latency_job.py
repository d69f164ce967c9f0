"""Jobs with latency budgets: the table measured in the job (and stored when the job is
recorded), or named by id (resolved by the worker, refused when it is not the tenant's) or as a
file; the plan's predicted latency within the budget; FP32, uniform and mixed predicted against
measured in the result and the report. No timing is asserted to be fast."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import Engine

from allocator.errors import BadBudget, BadReference, BadSpec
from allocator.job import JobSpec
from allocator.job_metrics import JobMetrics
from allocator.pipeline import run
from db import repositories
from db.models import Job
from db.session import make_session_factory
from db.store import FolderStore
from workers.record import record_success, runnable_spec

pytestmark = pytest.mark.slow  # runs small ResNet20 jobs


@pytest.fixture(scope="module")
def measured(resnet20_job: JobSpec, tmp_path_factory: pytest.TempPathFactory):
    """A job whose latency table is measured in the job (ONNX Runtime), under a budget of
    size and latency."""
    spec = replace(
        resnet20_job,
        budget="avg-bits=6,latency=3x",
        bits=(4, 8),
        calibration="fp32",
        latency_runtime="onnxruntime-cpu",
    )
    workdir = tmp_path_factory.mktemp("job")
    return spec, run(spec, workdir=workdir), workdir


def test_job_measures_its_table_and_meets_the_budget(measured) -> None:
    _spec, result, workdir = measured
    figures = result.metrics.latency
    assert figures is not None and figures.measured_in_job and figures.table is not None
    assert figures.runtime == "onnxruntime-cpu" and figures.input_shape == (1, 3, 32, 32)
    assert result.solver["latency_ms"] <= figures.budget_ms
    names = [p.plan for p in figures.plans]
    assert names[0] == "fp32" and names[-1] == "mixed"
    for entry in figures.plans:
        assert entry.predicted_ms > 0 and entry.error is None
        assert entry.measured_ms is not None and entry.measured_ms > 0
    mixed = figures.plan("mixed")
    assert mixed.predicted_ms == pytest.approx(result.solver["latency_ms"])
    assert set(figures.uniform_predicted) == {str(result.metrics.uniform.bits)}
    again = JobMetrics.from_dict(json.loads(json.dumps(result.metrics.to_dict())))
    assert again.latency == figures
    report = (Path(workdir) / "report.html").read_text()
    assert "Latency" in report and "predicted" in report


def test_recorded_table_is_stored_and_named_by_later_jobs(
    measured, engine: Engine, tmp_path: Path
) -> None:
    spec, result, _workdir = measured
    sessions = make_session_factory(engine)
    store = FolderStore(tmp_path / "store")
    with sessions() as session:
        job, _ = repositories.create_job(session, tenant="acme", spec=spec.to_dict())
        payload = record_success(session, store, job.id, replace(result, artifacts={}))
    table_id = payload["metrics"]["latency"]["table_id"]
    assert (table_id and "table" not in payload["metrics"]["latency"]) or (
        payload["metrics"]["latency"]["table"] is None
    )
    named = replace(spec, latency_runtime=None, latency_table=table_id)
    with sessions() as session:
        later, _ = repositories.create_job(session, tenant="acme", spec=named.to_dict())
        local = runnable_spec(session, store, session.get(Job, later.id), tmp_path)
        assert Path(local.latency_table).is_file()
        other, _ = repositories.create_job(session, tenant="globex", spec=named.to_dict())
        with pytest.raises(BadReference, match="not a measured latency table of yours"):
            runnable_spec(session, store, session.get(Job, other.id), tmp_path)
    second = run(local)
    assert second.metrics.latency.table_id == table_id
    assert not second.metrics.latency.measured_in_job
    assert second.solver["latency_ms"] <= second.metrics.latency.budget_ms


def test_latency_budgets_need_a_table_and_the_right_model(measured, tmp_path: Path) -> None:
    spec, result, _workdir = measured
    with pytest.raises(BadBudget, match="needs a latency table"):
        replace(spec, latency_runtime=None).validate()
    table = dict(result.metrics.latency.table)
    table["model_sha256"] = "f" * 64
    path = tmp_path / "other.json"
    path.write_text(json.dumps(table))
    with pytest.raises(BadSpec, match="measured on another model"):
        run(replace(spec, latency_runtime=None, latency_table=str(path)))


def test_a_job_with_quantized_activations_times_its_uniform_and_mixed_plans(
    measured, tmp_path: Path
) -> None:
    """With 8-bit activations the uniform plan is packed and exported with its activation
    quantizers like the mixed one (it failed to pack: its applied plan lacked them)."""
    spec, _result, _workdir = measured
    spec = replace(
        spec,
        act_bits=8,
        act_quantizers="baseline",
        budget="avg-bits=8",
    )
    figures = run(spec, workdir=tmp_path / "job").metrics.latency
    assert figures is not None
    plans = {entry.plan: entry for entry in figures.plans}
    assert {"uniform", "mixed"} <= set(plans)
    assert all(entry.error is None and entry.measured_ms for entry in plans.values())
