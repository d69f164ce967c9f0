"""Checks a job spec passes before it is queued, so bad input fails in the request, not hours later.

A job may name files only as uploads of its own tenant or as paths under the roots the operator
allowed: anything else would let one tenant read another's files or the server's. The checks
that need no model are made here (every spec bound, method, budget syntax, the model reference
and its options, file references), a model that can be built on the meta device is built there
to estimate the job's memory, and a budget is checked against a cached cost table when one
matches, which is how an infeasible budget is refused with the smallest feasible size before
any worker spends time on it. Workers repeat the path and memory checks where they open files
and load the model (`workers.record.runnable_spec`, `allocator.prepare.prepare`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from allocator.errors import BadReference
from allocator.job import INPUT_KINDS, UPLOAD_REF_PREFIX, JobSpec, UploadKind
from allocator.latency_table import LatencyTable
from allocator.limits import Limits
from allocator.memory import image_sample
from allocator.prepare import check_memory
from allocator.zoo import check_ref, meta_model, ref_paths
from db import repositories
from service.profiles import answer_budgets
from service.schemas import ID_PATTERN
from workers.record import LATENCY_TABLE_ID, confined_path, file_sha256, profile_key

UPLOAD_ID = re.compile(ID_PATTERN)
FEASIBILITY_TIME_LIMIT = 1.0
"""Seconds the early budget check may spend; the job itself solves with the spec's limit."""


def check_spec(
    session: Session, tenant: str, spec: JobSpec, allowed_roots: Sequence[Path], limits: Limits
) -> None:
    """Raise the error a worker would raise later, for everything knowable without the model's
    weights."""
    _check_text(spec.to_dict())
    spec.validate(limits)
    check_ref(spec.model)
    for path in ref_paths(spec.model):
        confined_path(str(path), "model", allowed_roots)
    _check_memory(spec, limits)
    shas = {
        field: _file_sha256(session, tenant, field, ref, allowed_roots)
        for field in INPUT_KINDS
        if (ref := getattr(spec, field)) is not None
    }
    profile = repositories.get_profile(
        session, tenant=tenant, key=profile_key(spec, shas.get("weights"), shas["calib"])
    )
    latency = _latency_table(session, tenant, spec.latency_table, allowed_roots)
    if profile is not None:
        answer_budgets(
            profile.cost_table,
            [spec.budget],
            FEASIBILITY_TIME_LIMIT,
            latency,
            require_latency=False,
        )


def _latency_table(
    session: Session, tenant: str, ref: str | None, allowed_roots: Sequence[Path]
) -> LatencyTable | None:
    """The latency table a spec names: a measured table of the tenant's (by id) or a table
    file under the allowed roots; anything else is refused now, not by the worker later."""
    if ref is None:
        return None
    if not LATENCY_TABLE_ID.fullmatch(ref):
        path = confined_path(ref, "latency_table", allowed_roots)
        if not path.is_file():
            raise BadReference(f"latency_table {ref[:80]!r} is neither a table id nor a file")
        return None
    row = repositories.measured_latency_table(session, tenant=tenant, table_id=ref)
    return LatencyTable.from_dict({**row.table, "table_id": row.id})


def _check_memory(spec: JobSpec, limits: Limits) -> None:
    """Estimate the job's memory on the meta device, for sources that can build there (image
    models: timm and the zoo); the worker checks every model again once it is loaded."""
    model = meta_model(spec.model)
    if model is not None and model.input_kind == "image":
        check_memory(spec, model, image_sample(model), limits)


def _file_sha256(
    session: Session, tenant: str, field: str, ref: str, allowed_roots: Sequence[Path]
) -> str:
    if ref.startswith(UPLOAD_REF_PREFIX):
        return _upload_sha256(session, tenant, field, ref)
    path = confined_path(ref, field, allowed_roots)
    if not path.is_file():
        raise BadReference(f"{field} {ref!r} is not a file on the server; upload it instead")
    return file_sha256(path)


def _upload_sha256(session: Session, tenant: str, field: str, ref: str) -> str:
    kind = INPUT_KINDS[field]
    upload_id = ref.removeprefix(UPLOAD_REF_PREFIX)
    upload = (
        repositories.get_upload(session, tenant=tenant, upload_id=upload_id)
        if UPLOAD_ID.fullmatch(upload_id)
        else None
    )
    if upload is None:
        raise BadReference(f"{field} {ref!r} names no upload of yours; upload the file first")
    if upload.kind != kind:
        endpoint = "/v1/models" if kind is UploadKind.MODEL else "/v1/datasets"
        raise BadReference(
            f"{field} {ref!r} is a {upload.kind.value} upload; upload a {kind.value} to {endpoint}"
        )
    return upload.sha256


def _check_text(value: Any) -> None:
    """No NUL characters anywhere in the spec: PostgreSQL cannot store them in text or JSONB,
    and no model, file or layer name contains one."""
    if isinstance(value, str):
        if "\x00" in value:
            raise BadReference(f"{value!r} contains a NUL character; remove it")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key)
            _check_text(item)
    elif isinstance(value, list):
        for item in value:
            _check_text(item)
