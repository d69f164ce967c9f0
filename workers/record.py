"""Turn a stored job into pipeline inputs, and a finished `allocator.job.Result` into rows.

The only place that knows both the allocator's result and the database: the CLI's `run`, the
inline executor and the Celery task all start a job through `runnable_spec` and finish it through
`record_success`, so a job's stored form never depends on which front end ran it. A job spec names
uploaded files as `upload:<id>` (what the tenant wrote, valid on every machine that shares the
artifact store); only a worker turns that into a local path, just before running.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from allocator.errors import BadReference, BitplanError
from allocator.job import INPUT_KINDS, UPLOAD_REF_PREFIX, JobSpec, Result, artifact_url
from allocator.profile import file_sha256
from allocator.zoo import ref_paths
from db import repositories
from db.models import Job, Profile
from db.repositories import ArtifactRecord, ProfileKey, canonical_sha256
from db.store import ArtifactStore

PROFILE_OPTIONS = (
    "bits",
    "calib_samples",
    "batch_size",
    "pin_first_last",
    "pins",
    "bias_correction",
    "seed",
)
"""The spec fields besides model, weights, calibration data and method that shape a cost table."""

ARTIFACT_KINDS = {
    "model": "packed-safetensors",
    "bitplan": "bitplan-json",
    "profile": "profile-json",
    "report": "report-html",
    "pareto": "pareto-png",
    "onnx": "onnx-model",
}


ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~-])/(?:[^\s'\"():,;/]+/)+([^\s'\"():,;/]*)")
"""An absolute path in free text (not the path part of a URL); group 1 is its last component."""
UPLOAD_LINK = r"/([0-9a-fA-F-]{36})\.[A-Za-z0-9]+"
LATENCY_TABLE_ID = re.compile(r"[0-9a-fA-F-]{36}")
"""A spec's `latency_table` naming a stored table (a UUID); anything else is a file path."""
"""How `runnable_spec` names an upload's link inside the job's folder."""


def public_error(text: str, workdir: Path) -> str:
    """A failed job's reason as a tenant may read it: its first line, uploads named by their
    `upload:<id>` ref, every other server path cut to its file name.

    Exceptions from libraries quote the files they opened (the job's temp folder, the artifact
    store, site-packages); a tenant needs to know which of its inputs failed, not where the
    server keeps it, and a path's existence must not be probed through error texts.
    """
    line = next((part for part in text.strip().splitlines() if part.strip()), text.strip())
    line = re.sub(re.escape(str(workdir)) + UPLOAD_LINK, r"upload:\1", line)
    return ABSOLUTE_PATH.sub(lambda found: found.group(1) or "(a server folder)", line)


def store_artifacts(store: ArtifactStore, files: dict[str, str]) -> list[ArtifactRecord]:
    records = []
    for name, path in files.items():
        stored = store.put_file(Path(path))
        records.append(
            ArtifactRecord(
                name=name,
                kind=ARTIFACT_KINDS.get(name, "file"),
                sha256=stored.sha256,
                size=stored.size,
                uri=stored.uri,
            )
        )
    return records


def record_success(
    session: Session, store: ArtifactStore, job_id: str, result: Result
) -> dict[str, Any]:
    """Store artifacts and the result row; returns the result JSON with the stored artifacts'
    local paths (for the CLI on this machine). The stored result names them by API URL."""
    if "onnx" in result.artifacts:
        from allocator.export.onnx_qdq import stamp  # loads onnx, only for a job that exported

        stamp(result.artifacts["onnx"], job_id)
    records = store_artifacts(store, result.artifacts)
    result.job_id = job_id
    tenant = session.get(Job, job_id, populate_existing=True).tenant
    record_latency_table(session, tenant, job_id, result)
    result.artifacts = {r.name: artifact_url(job_id, r.name) for r in records}
    profile = record_profile(session, tenant, result.spec, result.profile)
    payload = {**result.to_json(), "profile_id": profile.id}
    repositories.finish_job(
        session,
        job_id=job_id,
        bit_plan=result.plan.to_dict(),
        metrics=result.metrics.to_dict(),
        solver=result.solver,
        result={**payload, "profile": result.profile},
        artifacts=records,
        timings=result.timings,
    )
    return {**payload, "artifacts": {r.name: str(store.path(r.uri)) for r in records}}


def record_latency_table(session: Session, tenant: str, job_id: str, result: Result) -> None:
    """A latency table the job measured is stored for later jobs (`db.repositories.latency`)
    and named in the result by its id instead of carried whole."""
    figures = result.metrics.latency
    if figures is None or figures.table is None:
        return
    row = repositories.put_latency_table(
        session,
        tenant=tenant,
        table=figures.table,
        request={"job_id": job_id, "model": result.spec.model, "runtime": figures.runtime},
    )
    result.metrics = replace(result.metrics, latency=replace(figures, table=None, table_id=row.id))


def latency_table_file(session: Session, tenant: str, table_id: str, folder: Path) -> Path:
    """The tenant's stored latency table `table_id` as a JSON file in `folder`, what the
    pipeline reads; a table that is not the tenant's, or not measured (yet), is refused."""
    row = repositories.measured_latency_table(session, tenant=tenant, table_id=table_id)
    path = folder / f"latency-{row.id}.json"
    path.write_text(json.dumps({**row.table, "table_id": row.id}))
    return path


def runnable_spec(
    session: Session,
    store: ArtifactStore,
    job: Job,
    folder: Path,
    allowed_roots: Sequence[Path] | None = None,
) -> JobSpec:
    """The job's spec with every `upload:<id>` replaced by a link in `folder` to the stored file.

    The link keeps the uploaded file's suffix, because readers choose the format by it. Every
    other path the job names (weights, data, an `hf:` folder) must lie under `allowed_roots`,
    checked here, where the worker opens it: the API checked it at submit, but on its own
    filesystem, and a folder can appear on a worker that the API never saw. `None` (the CLI's
    own jobs) checks nothing.
    """
    values = dict(job.spec)
    for field in INPUT_KINDS:
        ref = values.get(field)
        if isinstance(ref, str) and ref.startswith(UPLOAD_REF_PREFIX):
            values[field] = str(_link_upload(session, store, job.tenant, ref, folder))
        elif isinstance(ref, str) and allowed_roots is not None:
            confined_path(ref, field, allowed_roots)
    table = values.get("latency_table")
    if isinstance(table, str) and LATENCY_TABLE_ID.fullmatch(table):
        values["latency_table"] = str(latency_table_file(session, job.tenant, table, folder))
    elif isinstance(table, str) and allowed_roots is not None:
        confined_path(table, "latency_table", allowed_roots)
    spec = JobSpec.from_dict(values)
    if allowed_roots is not None:
        for path in ref_paths(spec.model):
            confined_path(str(path), "model", allowed_roots)
    return spec


def confined_path(ref: str, field: str, allowed_roots: Sequence[Path]) -> Path:
    """`ref` as a resolved server path (links followed, `..` gone) under one of the allowed
    roots, or `BadReference` telling the caller to upload the file instead."""
    path = _server_path(ref, field)
    if not any(path.is_relative_to(root.expanduser().resolve()) for root in allowed_roots):
        raise BadReference(
            f"{field} {ref!r} is a server path outside the allowed roots; upload the file "
            f"(POST /v1/models or /v1/datasets) and pass its 'upload:<id>' ref"
        )
    return path


def _server_path(ref: str, field: str) -> Path:
    """`ref` as an absolute server path; text no filesystem accepts is a bad reference, not a
    server error."""
    try:
        path = Path(ref).expanduser().resolve()
        path.exists()
    except (OSError, ValueError, RuntimeError) as error:
        raise BadReference(f"{field} {ref!r} is not a usable path ({error})") from None
    return path


def profile_key(spec: JobSpec, weights_sha256: str | None, calib_sha256: str) -> ProfileKey:
    """What identifies the cost table `spec` produces, given the sha256 of its weights and data
    files; the service computes the same key at submit time to check a budget early."""
    options = spec.to_dict()
    return ProfileKey.of(
        model_sha256=canonical_sha256({"model": spec.model, "weights": weights_sha256}),
        data_sha256=calib_sha256,
        method=spec.method,
        # A job with no evaluation file calibrates on the part of its file it does not hold out.
        options={name: options[name] for name in PROFILE_OPTIONS}
        | {"holds_out_eval": spec.eval is None},
    )


def record_profile(
    session: Session, tenant: str, spec: JobSpec, cost_table: dict[str, Any]
) -> Profile:
    """Cache the cost table of a finished run, so a new budget re-solves without a model pass.

    `spec` must name local files (a `runnable_spec`): their bytes are part of the key.
    """
    weights = file_sha256(Path(spec.weights)) if spec.weights else None
    key = profile_key(spec, weights, file_sha256(Path(spec.calib)))
    return repositories.put_profile(session, tenant=tenant, key=key, cost_table=cost_table)


def _link_upload(
    session: Session, store: ArtifactStore, tenant: str, ref: str, folder: Path
) -> Path:
    upload_id = ref.removeprefix(UPLOAD_REF_PREFIX)
    upload = repositories.get_upload(session, tenant=tenant, upload_id=upload_id)
    if upload is None:
        raise BitplanError(f"{ref} is not an upload of this tenant; upload the file again")
    link = folder / f"{upload.id}{Path(upload.filename or '').suffix}"
    link.unlink(missing_ok=True)
    link.symlink_to(store.path(upload.uri))
    return link
