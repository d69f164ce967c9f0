"""Measure a latency table on this machine and keep it: what `bitplan profile-latency` runs in
its own process, what the Celery task `bitplan.profile_latency` runs on a target machine's queue
(`LATENCY_QUEUE`, or any queue an operator adds: `bitplan worker --queues latency`), and what
the API's inline executor runs in a thread.

A request names the model (a ref and weights: a server path under the allowed roots or an
`upload:<id>`), the input shape, the runtime, and optionally the candidate widths and the
number of warm-up and timed runs. Before measuring, the key of the table this machine would
produce (model digest, shape, runtime, version, machine fingerprint) is looked up: a table
already stored under it is reused (`reused_from` in the request) unless the request says
`force`.

Imports torch (through `allocator.export.latency`) only when a table is measured.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from allocator.errors import BadSpec, BitplanError
from allocator.job import ACT_BITS, UPLOAD_REF_PREFIX, WEIGHT_BITS
from allocator.latency_table import (
    FLOAT_WIDTH,
    LatencyTable,
    check_runtime,
    fingerprint,
    parse_shape,
    shape_text,
)
from db import repositories
from db.models import LatencyTableRow
from db.store import ArtifactStore
from workers.periodic import Periodic
from workers.record import _link_upload, confined_path, public_error
from workers.settings import WorkerSettings

LATENCY_QUEUE = "latency"
"""The queue latency requests go to unless they name another: a platform starts workers on
its target machines with `bitplan worker --queues latency`."""
DEFAULT_LEASE_SECONDS = WorkerSettings().lease_seconds
MAX_REPEATS = 1000
MAX_WARMUP = 1000


def check_request(request: Mapping[str, Any]) -> dict[str, Any]:
    """A request's fields, bounded (a tenant writes them): model ref, weights, input shape,
    runtime, widths, warm-up and repeats."""
    known = {"model", "weights", "input_shape", "runtime", "bits", "act_bits", "warmup"}
    known |= {"repeats", "force"}
    unknown = sorted(set(request) - known)
    if unknown:
        raise BadSpec(f"unknown latency request fields {unknown[:5]}")
    model = request.get("model")
    if not isinstance(model, str) or not model or len(model) > 2048:
        raise BadSpec("a latency request names its model (a model ref, e.g. zoo:cifar_resnet20)")
    weights = request.get("weights")
    if weights is not None and (not isinstance(weights, str) or len(weights) > 4096):
        raise BadSpec("weights is a path or an upload:<id> ref")
    runtime = str(request.get("runtime", "onnxruntime-cpu"))
    check_runtime(runtime)
    shape = parse_shape(request.get("input_shape") or "")
    bits = tuple(int(b) for b in request.get("bits") or (2, 3, 4, 5, 6, 8, 16))
    if not bits or any(b not in WEIGHT_BITS for b in bits):
        raise BadSpec(f"bits must be among {', '.join(map(str, WEIGHT_BITS))}")
    acts = tuple(int(a) for a in request.get("act_bits") or (4, 6, 8))
    if any(a not in (*ACT_BITS, FLOAT_WIDTH) for a in acts):
        raise BadSpec(f"act_bits must be among {', '.join(map(str, ACT_BITS))}")
    warmup, repeats = int(request.get("warmup", 10)), int(request.get("repeats", 50))
    if not (0 <= warmup <= MAX_WARMUP and 1 <= repeats <= MAX_REPEATS):
        raise BadSpec(f"warmup in 0..{MAX_WARMUP} and repeats in 1..{MAX_REPEATS}")
    return {
        "model": model,
        "weights": weights,
        "input_shape": shape_text(shape),
        "runtime": runtime,
        "bits": list(bits),
        "act_bits": list(acts),
        "warmup": warmup,
        "repeats": repeats,
        "force": bool(request.get("force", False)),
    }


def measure(
    request: Mapping[str, Any],
    weights: str | None,
    reuse: Any = None,
) -> tuple[LatencyTable, bool]:
    """Measure the table a checked `request` asks for, with `weights` a local path; `reuse`
    (key -> stored table dict or None) answers first unless the request says `force`. The
    table and whether it was reused."""
    from allocator.export.latency import machine, measure_table, model_digest, runtime_version
    from allocator.zoo import load_model

    model = load_model(request["model"], weights)
    shape = parse_shape(request["input_shape"])
    runtime = request["runtime"]
    if reuse is not None and not request.get("force"):
        key = (
            model_digest(model),
            shape_text(shape),
            runtime,
            runtime_version(runtime),
            fingerprint(machine(runtime)),
        )
        stored = reuse(key)
        if stored is not None:
            return LatencyTable.from_dict(stored), True
    table = measure_table(
        model,
        shape,
        runtime,
        weight_widths=request["bits"],
        act_widths=[*request["act_bits"], FLOAT_WIDTH],
        warmup=request["warmup"],
        repeats=request["repeats"],
    )
    return table, False


def measure_local(
    sessions: sessionmaker[Session], *, tenant: str, request: Mapping[str, Any]
) -> tuple[LatencyTable, bool]:
    """`bitplan profile-latency` on this machine: measure (or reuse) and store the table; the
    table carries its row id. Paths are the caller's own (no allowed roots)."""
    checked = check_request(request)

    def reuse(key: tuple[str, str, str, str, str]) -> dict[str, Any] | None:
        with sessions() as session:
            row = repositories.find_latency_table(session, tenant=tenant, key=key)
            return None if row is None else _with_id(row)

    table, reused = measure(checked, checked["weights"], reuse)
    if reused:
        return table, True
    with sessions() as session:
        row = repositories.put_latency_table(
            session, tenant=tenant, table=table.to_dict(), request=checked
        )
        return replace(table, table_id=row.id), False


def run_request(
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    table_id: str,
    allowed_roots: Sequence[Path] | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
) -> str | None:
    """Measure a queued request on this machine (a worker on its queue); its row ends
    succeeded with the table, or failed with a reason the tenant may read. None when the
    request was not queued any more (taken by another worker). While it measures, a
    heartbeat renews its lease every third of `lease_seconds`; a sweep fails the request
    once the lease lapses (`repositories.fail_expired_latency_tables`)."""
    with sessions() as session:
        row = repositories.start_latency_table(
            session, table_id=table_id, lease_seconds=lease_seconds
        )
        if row is None:
            return None
        tenant, request = row.tenant, dict(row.request)

    def heartbeat() -> None:
        with sessions() as session:
            repositories.renew_latency_lease(
                session, table_id=table_id, lease_seconds=lease_seconds
            )

    with (
        Periodic(f"bitplan latency lease {table_id}", lease_seconds / 3, heartbeat),
        tempfile.TemporaryDirectory(prefix="bitplan-latency-") as tmp,
    ):
        try:
            checked = check_request(request)
            with sessions() as session:
                weights = _local_weights(
                    session, store, tenant, checked["weights"], Path(tmp), allowed_roots
                )

            def reuse(key: tuple[str, str, str, str, str]) -> dict[str, Any] | None:
                with sessions() as session:
                    found = repositories.find_latency_table(session, tenant=tenant, key=key)
                    return None if found is None or found.id == table_id else _with_id(found)

            table, _reused = measure(checked, weights, reuse)
        except Exception as error:  # every ending is recorded on the row
            reason = str(error) if isinstance(error, BitplanError) else repr(error)
            with sessions() as session:
                repositories.fail_latency_table(
                    session, table_id=table_id, error=public_error(reason, Path(tmp))
                )
            return "failed"
    with sessions() as session:
        repositories.finish_latency_table(
            session, table_id=table_id, table=replace(table, table_id=table_id).to_dict()
        )
    return "succeeded"


def _local_weights(
    session: Session,
    store: ArtifactStore,
    tenant: str,
    ref: str | None,
    folder: Path,
    allowed_roots: Sequence[Path] | None,
) -> str | None:
    """The weights as a local path: an upload linked into `folder`, or a server path checked
    against the allowed roots (None: the CLI's own paths, unchecked)."""
    if ref is None:
        return None
    if ref.startswith(UPLOAD_REF_PREFIX):
        return str(_link_upload(session, store, tenant, ref, folder))
    if allowed_roots is not None:
        confined_path(ref, "weights", allowed_roots)
    return ref


def _with_id(row: LatencyTableRow) -> dict[str, Any]:
    return {**(row.table or {}), "table_id": row.id}
