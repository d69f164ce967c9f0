"""Latency tables: measured per layer and choice (ONNX Runtime's QDQ kernels, torch's flat
table said so), stored and found by key per tenant, `bitplan profile-latency` reusing a stored
table, and a queued request measured by a worker. Timings are never asserted to be fast: on
this CPU the QDQ kernels may well be slower than float, and the table is what was measured."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine
from typer.testing import CliRunner

from allocator.export.latency import measure_table, model_digest
from allocator.latency_table import FLOAT_WIDTH, LatencyStatus, LatencyTable, choice_key
from allocator.zoo import load_model
from db import repositories
from db.session import make_session_factory
from db.store import FolderStore
from service.cli import app
from workers.executor import InlineExecutor
from workers.latency import check_request, run_request
from workers.settings import WorkerSettings

FAST = {"warmup": 1, "repeats": 3}


@pytest.fixture(scope="module")
def resnet20_table(resnet20_inputs: tuple[Path, Path]) -> LatencyTable:
    weights, _images = resnet20_inputs
    model = load_model("zoo:cifar_resnet20", str(weights))
    return measure_table(
        model, (1, 3, 32, 32), "onnxruntime-cpu", weight_widths=(2, 4, 8), act_widths=(8,), **FAST
    )


def test_onnxruntime_table_covers_every_layer_and_choice(
    resnet20_table: LatencyTable, resnet20_inputs: tuple[Path, Path]
) -> None:
    table = resnet20_table
    model = load_model("zoo:cifar_resnet20", str(resnet20_inputs[0]))
    assert table.model_sha256 == model_digest(model)
    assert len(table.entries) == 20 and "conv1" in table.entries and "linear" in table.entries
    expected = {choice_key(w, a) for w in (2, 4, 8, FLOAT_WIDTH) for a in (8, FLOAT_WIDTH)}
    assert all(set(row) == expected for row in table.entries.values())
    assert all(ms >= 0 for row in table.entries.values() for ms in row.values())
    variants = table.settings["variants"]
    # 2 and 4 bits are both INT4 codes: one kernel, one measurement.
    assert variants["W2A32"] == variants["W4A32"] == "int4/float"
    assert variants["W8A8"] == "int8/uint8" and variants["W32A32"] == "float/float"
    row = table.entries["conv1"]
    assert row["W2A32"] == row["W4A32"]
    assert not table.flat and table.rest_ms >= 0 and table.fp32_measured_ms > 0
    assert table.fp32_ms() >= table.fp32_measured_ms - 1e-9  # rest_ms makes up the difference
    # The rest of a run with every site at 8 bits, measured on the W8A8 export.
    assert set(table.act_rest_ms) == {"8"} and table.act_rest_ms["8"] >= 0
    assert table.machine["threads"] >= 1 and table.runtime_version.startswith("onnxruntime")
    assert LatencyTable.from_dict(json.loads(json.dumps(table.to_dict()))) == table


def test_torch_table_is_flat_and_says_so(resnet20_inputs: tuple[Path, Path]) -> None:
    model = load_model("zoo:cifar_resnet20", str(resnet20_inputs[0]))
    table = measure_table(
        model, (1, 3, 32, 32), "torch-cpu", weight_widths=(2, 8), act_widths=(8,), **FAST
    )
    assert table.flat and "no low-bit kernels" in table.notes[0]
    for row in table.entries.values():
        assert row["W2A32"] == row["W8A32"] == row["W32A32"]
        assert row["W2A8"] == row["W8A8"]


def test_repository_keys_tables_per_tenant(engine: Engine, resnet20_table: LatencyTable) -> None:
    sessions = make_session_factory(engine)
    data = resnet20_table.to_dict()
    with sessions() as session:
        row = repositories.put_latency_table(session, tenant="acme", table=data, request={})
        assert row.status is LatencyStatus.SUCCEEDED and row.input_shape == "1x3x32x32"
        key = resnet20_table.key
        assert repositories.find_latency_table(session, tenant="acme", key=key).id == row.id
        assert repositories.find_latency_table(session, tenant="globex", key=key) is None
        assert repositories.get_latency_table(session, tenant="globex", table_id=row.id) is None
        asked = repositories.request_latency_table(
            session,
            tenant="acme",
            request={"input_shape": "1x3x32x32", "runtime": "onnxruntime-cpu"},
            queue="latency",
        )
        assert asked.status is LatencyStatus.QUEUED and asked.model_sha256 is None
        started = repositories.start_latency_table(session, table_id=asked.id, lease_seconds=60)
        assert started is not None and started.lease_expires_at is not None
        assert (
            repositories.start_latency_table(session, table_id=asked.id, lease_seconds=60) is None
        )
        repositories.fail_latency_table(session, table_id=asked.id, error="no such model")
        listed = repositories.list_latency_tables(session, tenant="acme")
        assert {r.id for r in listed} == {row.id, asked.id}


def test_a_request_whose_worker_stopped_is_failed_by_the_sweep(
    engine: Engine, tmp_path: Path
) -> None:
    """A running request whose lease lapses (its worker died mid-measurement) ends failed
    with a reason the tenant can act on; one whose worker renews its lease stays running."""
    sessions = make_session_factory(engine)
    request = {"input_shape": "1x3x32x32", "runtime": "onnxruntime-cpu"}
    with sessions() as session:
        dead, alive = (
            repositories.request_latency_table(
                session, tenant="acme", request=request, queue="latency"
            ).id
            for _ in range(2)
        )
        for table_id in (dead, alive):
            repositories.start_latency_table(session, table_id=table_id, lease_seconds=0.5)
    time.sleep(1.0)
    with sessions() as session:
        assert repositories.renew_latency_lease(session, table_id=alive, lease_seconds=60)
    InlineExecutor(WorkerSettings(), sessions, FolderStore(tmp_path / "store")).sweep()
    with sessions() as session:
        failed = repositories.get_latency_table(session, tenant="acme", table_id=dead)
        running = repositories.get_latency_table(session, tenant="acme", table_id=alive)
        assert failed.status is LatencyStatus.FAILED and failed.lease_expires_at is None
        assert "stopped before it finished; request the table again" in failed.error
        assert running.status is LatencyStatus.RUNNING
        assert not repositories.renew_latency_lease(session, table_id=dead, lease_seconds=60)


def test_a_queued_request_is_measured_once(
    engine: Engine, resnet20_inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    sessions = make_session_factory(engine)
    weights = str(resnet20_inputs[0])
    request = check_request(
        {
            "model": "zoo:cifar_resnet20",
            "weights": weights,
            "input_shape": "1,3,32,32",
            "bits": [4, 8],
            "act_bits": [8],
            **FAST,
        }
    )
    with sessions() as session:
        asked = repositories.request_latency_table(
            session, tenant="acme", request=request, queue="latency"
        )
    store = FolderStore(tmp_path / "store")
    assert run_request(sessions, store, asked.id, allowed_roots=[Path(weights).parent]) == (
        "succeeded"
    )
    assert run_request(sessions, store, asked.id) is None  # a redelivered message
    with sessions() as session:
        row = repositories.get_latency_table(session, tenant="acme", table_id=asked.id)
        assert row.status is LatencyStatus.SUCCEEDED and row.machine_sha256
        assert LatencyTable.from_dict(row.table).table_id == asked.id
        outside = repositories.request_latency_table(
            session, tenant="acme", request=request, queue="latency"
        )
    assert run_request(sessions, store, outside.id, allowed_roots=[tmp_path]) == "failed"
    with sessions() as session:
        row = repositories.get_latency_table(session, tenant="acme", table_id=outside.id)
        assert "outside the allowed roots" in row.error and str(tmp_path) not in row.error


def test_cli_measures_then_reuses(
    resnet20_inputs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BITPLAN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("BITPLAN_DATABASE_URL", raising=False)
    args = [
        "profile-latency", "--model", "zoo:cifar_resnet20", "--weights",
        str(resnet20_inputs[0]), "--input-shape", "1,3,32,32", "--bits", "4,8",
        "--act-bits", "8", "--warmup", "1", "--repeats", "3",
    ]  # fmt: skip
    first = CliRunner().invoke(app, [*args, "--json"])
    assert first.exit_code == 0, first.stderr
    measured = json.loads(first.stdout)
    assert not measured["reused"] and measured["table_id"]
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.stderr
    assert f"latency table {measured['table_id']}  (reused)" in again.stdout
    assert "layer3.2.conv2" in again.stdout and "W8A8" in again.stdout
    bad = CliRunner().invoke(app, [*args[:5], "--input-shape", "1,3,32", "--runtime", "tvm"])
    assert bad.exit_code == 2 and "not one of" in bad.stderr
