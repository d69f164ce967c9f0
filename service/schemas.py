"""The request and response bodies of the HTTP API, with the examples the OpenAPI page shows.

A job's spec is `allocator.job.JobSpec` itself, validated by pydantic, so the API, the CLI and
the workers can never disagree on what a job is or on its defaults. Everything else here is the
wire form of a database row or of a solver answer; converting rows is done by the `of` class
methods so routes stay one line per step.

`service.client` imports this module, so it must load neither torch nor SQLAlchemy: the rows
the `of` methods read are imported for type checking only.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import AnyHttpUrl, AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from allocator.job import UPLOAD_REF_PREFIX, JobSpec, JobStatus, UploadKind, artifact_url
from workers.settings import BATCH_QUEUE, GPU_QUEUE, INTERACTIVE_QUEUE

if TYPE_CHECKING:
    from db.models import Artifact, Job, LatencyTableRow, Profile, Upload

Queue = Literal[INTERACTIVE_QUEUE, BATCH_QUEUE, GPU_QUEUE]
"""`gpu` goes to the workers started with `bitplan worker --queue gpu --device cuda`; a job
there whose spec names no device runs on theirs."""
MAX_SWEEP_JOBS = 1000
ID_PATTERN = r"^[0-9a-fA-F-]{36}$"
"""Ids of jobs, uploads and profiles are UUIDs; anything else is refused before any query."""

SPEC_EXAMPLE: dict[str, Any] = {
    "model": "zoo:cifar_resnet20",
    "weights": "upload:7d7f1c1e-2b1a-4a53-9a43-5bb1c1f0e6a2",
    "calib": "upload:0b8e3a54-6f1e-4b8e-8a51-3c0f3c9d2f10",
    "budget": "avg-bits=3.5",
    "method": "lrp+fisher",
    "bits": [2, 3, 4, 5, 6, 8],
    "calib_samples": 128,
}


class Body(BaseModel):
    """Requests reject unknown fields: a misspelt option must fail, not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


class ErrorOut(BaseModel):
    detail: str = Field(examples=["cannot read budget term 'avg-bitz=4' in 'avg-bitz=4'; ..."])
    error: str | None = Field(
        default=None,
        examples=["BadBudget"],
        description="The error type, to branch on; absent for plain 401/404 answers.",
    )
    smallest_feasible_bits: float | None = Field(
        default=None, description="For InfeasibleBudget: the smallest size any plan reaches."
    )


class UploadOut(BaseModel):
    id: str
    ref: str = Field(description="What a job spec writes to use this file.")
    kind: UploadKind
    sha256: str
    size: int
    filename: str | None
    created_at: datetime

    @classmethod
    def of(cls, upload: Upload) -> UploadOut:
        return cls(
            id=upload.id,
            ref=f"{UPLOAD_REF_PREFIX}{upload.id}",
            kind=upload.kind,
            sha256=upload.sha256,
            size=upload.size,
            filename=upload.filename,
            created_at=upload.created_at,
        )


class JobRequest(Body):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "spec": SPEC_EXAMPLE,
                    "queue": "interactive",
                    "callback_url": "https://ml-platform.example.com/hooks/bitplan",
                }
            ]
        },
    )

    spec: JobSpec = Field(
        description=(
            "As `bitplan run` takes it. `weights`, `calib` and `eval` are `upload:<id>` refs "
            "from POST /v1/models and /v1/datasets, or paths under the server's allowed roots."
        )
    )
    queue: Queue = INTERACTIVE_QUEUE
    priority: int = Field(default=0, ge=-100, le=100, description="Higher runs first.")
    not_before: AwareDatetime | None = Field(
        default=None, description="Do not start before this time (overnight runs)."
    )
    callback_url: AnyHttpUrl | None = Field(
        default=None,
        max_length=2048,
        description="POSTed once the job ends, signed in the X-Bitplan-Signature header.",
    )


class JobOut(BaseModel):
    model_config = ConfigDict(
        from_attributes=True,
        json_schema_extra={
            "examples": [
                {
                    "id": "5f0c2a0e-4d7b-4c36-9b57-1c2b8c7f9e11",
                    "status": "running",
                    "phase": "sensitivity",
                    "progress": 0.42,
                    "queue": "interactive",
                    "priority": 0,
                    "not_before": None,
                    "attempts": 1,
                    "max_attempts": 3,
                    "cancel_requested": False,
                    "error": None,
                    "created_at": "2025-01-01T21:00:00Z",
                    "started_at": "2025-01-01T21:00:01Z",
                    "finished_at": None,
                    "timings": {},
                    "spec": SPEC_EXAMPLE,
                    "callback_url": None,
                }
            ]
        },
    )

    id: str
    status: JobStatus
    phase: str | None = Field(description="The pipeline phase running now (load, solve, ...).")
    progress: float = Field(ge=0, le=1)
    queue: str
    priority: int
    not_before: datetime | None
    attempts: int = Field(description="Attempts started so far; a lost worker costs one.")
    max_attempts: int
    cancel_requested: bool
    error: str | None = Field(description="Why the last attempt failed, if it did.")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    timings: dict[str, Any] = Field(description="Seconds per phase, once the job succeeded.")
    spec: dict[str, Any]
    callback_url: str | None

    @classmethod
    def of(cls, job: Job) -> JobOut:
        return cls.model_validate(job)


class JobPageOut(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null at end.")


class ArtifactOut(BaseModel):
    name: str
    kind: str
    sha256: str
    size: int
    url: str

    @classmethod
    def of(cls, artifact: Artifact) -> ArtifactOut:
        return cls(
            name=artifact.name,
            kind=artifact.kind,
            sha256=artifact.sha256,
            size=artifact.size,
            url=artifact_url(artifact.job_id, artifact.name),
        )


RESULT_EXAMPLE: dict[str, Any] = {
    "job_id": "5f0c2a0e-4d7b-4c36-9b57-1c2b8c7f9e11",
    "profile_id": "b1a3c0de-1111-4c36-9b57-1c2b8c7f9e11",
    "model": "zoo:cifar_resnet20",
    "budget": "avg-bits=3.5",
    "method": "lrp+fisher",
    "allocation": [{"layer": "conv1", "weight_bits": 8, "params": 432, "pinned": True}],
    "avg_weight_bits": 3.49,
    "weight_bytes": 118000.0,
    "solver": {"name": "highs", "status": "optimal", "gap": 0.0},
    "metrics": {
        "primary": "top1",
        "fp32": {"top1": 81.0},
        "quantized": {"top1": 79.9},
        "uniform": {"bits": 3, "act_bits": None, "top1": 79.4},
        "comparison": {
            "verdict": "no measurable difference",
            "primary": {"metric": "top1", "value": 0.5, "low": -0.4, "high": 1.4},
            "closeness": {"metric": "agreement", "value": 1.2, "low": 0.4, "high": 2.0},
            "samples": 500,
            "resamples": 2000,
            "confidence": 0.95,
        },
        "eval_source": "holdout",
    },
    "timings": {"load": 0.4, "sensitivity": 3.1},
    "artifacts": {
        "model": "/v1/jobs/5f0c2a0e-4d7b-4c36-9b57-1c2b8c7f9e11/artifacts/model",
        "bitplan": "/v1/jobs/5f0c2a0e-4d7b-4c36-9b57-1c2b8c7f9e11/artifacts/bitplan",
    },
}


class SolveRequest(Body):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"budget": "size-mb=0.12"}]}
    )

    budget: str = Field(
        max_length=200,
        description="avg-bits=, size-mb=, compression=, bops=, latency-ms=, latency=0.6x",
    )
    time_limit: float | None = Field(
        default=None, gt=0, description="Solver seconds; capped by the server's limit."
    )
    latency_table: str | None = Field(
        default=None,
        pattern=ID_PATTERN,
        description="A measured latency table of yours: needed for a latency budget.",
    )


class ParetoRequest(Body):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"budgets": ["avg-bits=3", "avg-bits=4", "avg-bits=5"]}]},
    )

    budgets: list[str] = Field(min_length=1, max_length=64)
    time_limit: float | None = Field(default=None, gt=0)
    latency_table: str | None = Field(default=None, pattern=ID_PATTERN)


class LayerBits(BaseModel):
    layer: str
    weight_bits: int
    params: int
    pinned: bool


class SolveOut(BaseModel):
    budget: str
    allocation: list[LayerBits]
    avg_weight_bits: float
    weight_bytes: float
    solver: dict[str, Any] = Field(
        description="What the solver proved: name, status, gap, objective, seconds."
    )


class ParetoOut(BaseModel):
    profile_id: str
    points: list[SolveOut]


class ProfileOut(BaseModel):
    id: str
    method: str
    bits: list[int]
    layers: int
    model_sha256: str
    data_sha256: str
    created_at: datetime

    @classmethod
    def of(cls, profile: Profile) -> ProfileOut:
        return cls(
            id=profile.id,
            method=profile.method,
            bits=list(profile.cost_table.get("bits", [])),
            layers=len(profile.cost_table.get("layers", [])),
            model_sha256=profile.model_sha256,
            data_sha256=profile.data_sha256,
            created_at=profile.created_at,
        )


class SweepModel(Body):
    model: str
    weights: str | None = None
    calib: str | None = Field(default=None, description="Defaults to the template's.")
    eval: str | None = Field(default=None, description="Defaults to the template's.")


class SweepRequest(Body):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "spec": SPEC_EXAMPLE,
                    "models": [
                        {"model": "zoo:cifar_resnet20", "weights": "upload:7d7f1c1e-..."},
                        {"model": "zoo:cifar_resnet56", "weights": "upload:91aa03b2-..."},
                    ],
                    "budgets": ["avg-bits=3", "avg-bits=4"],
                    "not_before": "2025-01-01T22:00:00Z",
                }
            ]
        },
    )

    spec: JobSpec = Field(description="The template every job of the sweep starts from.")
    models: list[SweepModel] = Field(
        default_factory=list, max_length=100, description="Empty: the template's model only."
    )
    budgets: list[str] = Field(min_length=1, max_length=100)
    priority: int = Field(default=0, ge=-100, le=100)
    not_before: AwareDatetime | None = None
    callback_url: AnyHttpUrl | None = Field(default=None, max_length=2048)

    @model_validator(mode="after")
    def _bounded(self) -> SweepRequest:
        jobs = max(len(self.models), 1) * len(self.budgets)
        if jobs > MAX_SWEEP_JOBS:
            raise ValueError(
                f"a sweep of {jobs} jobs is above the limit of {MAX_SWEEP_JOBS}; split it"
            )
        return self


class SweepOut(BaseModel):
    jobs: list[JobOut]


class WebhookEvent(BaseModel):
    """The body POSTed to a job's callback URL."""

    event: Literal["job.finished"] = "job.finished"
    job: JobOut


class LatencyRequest(Body):
    """A latency table to measure on the machines serving `queue` (`bitplan worker --queue
    latency` on the target): the model, its input shape and the runtime, and optionally the
    candidate widths and the timing runs."""

    model: str = Field(max_length=2048, examples=["zoo:cifar_resnet20"])
    weights: str | None = Field(default=None, max_length=4096, examples=["upload:<id>"])
    input_shape: str = Field(max_length=64, examples=["1,3,32,32"])
    runtime: str = Field(default="onnxruntime-cpu", examples=["onnxruntime-cpu"])
    bits: list[int] | None = Field(default=None, max_length=8, examples=[[2, 3, 4, 5, 6, 8, 16]])
    act_bits: list[int] | None = Field(default=None, max_length=4, examples=[[4, 6, 8]])
    warmup: int = 10
    repeats: int = 50
    force: bool = Field(default=False, description="Measure even if a table is stored.")
    queue: str = Field(default="latency", max_length=64)


class LatencyTableOut(BaseModel):
    """A measured latency table (`table`, the JSON of `allocator.latency_table.LatencyTable`)
    or the request to measure one (`status` queued/running/failed with `error`)."""

    id: str
    status: str
    runtime: str
    input_shape: str
    queue: str | None
    model_sha256: str | None
    runtime_version: str | None
    machine_sha256: str | None
    table: dict[str, Any] | None
    error: str | None
    created_at: datetime
    finished_at: datetime | None

    @classmethod
    def of(cls, row: LatencyTableRow) -> LatencyTableOut:
        return cls(
            id=row.id,
            status=row.status.value,
            runtime=row.runtime,
            input_shape=row.input_shape,
            queue=row.queue,
            model_sha256=row.model_sha256,
            runtime_version=row.runtime_version,
            machine_sha256=row.machine_sha256,
            table=row.table,
            error=row.error,
            created_at=row.created_at,
            finished_at=row.finished_at,
        )
