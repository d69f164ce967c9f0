"""What a job is and what it produced: the types every front end shares, with no torch.

`JobSpec` (with its bounds and `validate`), `Result` and the `JobMetrics` in it, the pipeline's
phases and progress callback, a job's statuses, the files a spec names, which way each metric is
better, and the names a spec may choose from (sensitivity methods, activation widths, activation
quantizers).
`service.client`, `service.schemas` and the CLI's remote commands import this module, so an ML
platform can build, check, submit and follow jobs without torch or a database driver installed.

Never import torch, numpy, SQLAlchemy, FastAPI or Celery here, nor an allocator module that does
(`tests/test_imports.py` checks it in a fresh interpreter). `allocator.budget`,
`allocator.limits` and `allocator.errors` are torch-free.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from allocator.budget import Budget, parse_budget
from allocator.errors import BadBudget, BadSpec, UnknownMethod
from allocator.job_metrics import JobMetrics
from allocator.latency_table import check_runtime
from allocator.limits import Limits

if TYPE_CHECKING:
    from allocator.plan import BitPlan

# --- what a job runs through and how it ends ----------------------------------------------------

PHASES = (
    "load",
    "layers",
    "statistics",
    "sensitivity",
    "solve",
    "quantize",
    "evaluate",
    "pack",
)
"""The pipeline's phases, in order: what `Progress` names and a running job's `phase` shows."""
Progress = Callable[[str, float, str], None]
"""`progress(phase, fraction, message)`, called between phases and inside long loops."""


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


# --- the files a spec names ---------------------------------------------------------------------


class UploadKind(StrEnum):
    MODEL = "model"
    DATASET = "dataset"


UPLOAD_REF_PREFIX = "upload:"
"""A spec names an uploaded file `upload:<id>`; anything else is a path on the machine."""
INPUT_KINDS = {"weights": UploadKind.MODEL, "calib": UploadKind.DATASET, "eval": UploadKind.DATASET}
"""The spec fields that name files, and the kind of upload each may name."""


def artifact_url(job_id: str, name: str) -> str:
    """Where the API serves a job's artifact: what results and listings name, never a path."""
    return f"/v1/jobs/{job_id}/artifacts/{name}"


# --- the names and widths a spec may choose -----------------------------------------------------

DEFAULT_BITS = (2, 3, 4, 5, 6, 8)
WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
"""Widths a layer's weights may take: `bits` and `pins` choose among these."""
ACT_BITS = (4, 6, 8, 16)
"""Widths an activation may take (`allocator.quant.activation` quantizes at these)."""
JOINT = "auto"
"""`act_bits` value that lets the integer program choose every layer's activation width."""
FLOAT_ACT_BITS = 32
"""The width BOPs count a float (not quantized) activation at."""
PROBS_ACT_BITS = 8
"""Width of attention probabilities under joint allocation when the budget names no activation
width (a plain `bops=` budget): they feed no layer of the table, so the integer program does
not choose it. A `match=WxAy` budget runs them at y, as the uniform plan it matches does:
otherwise the joint plan would get 8-bit probabilities that the BOPs budget never paid for."""
ACT_QUANTIZERS = ("baseline", "repq", "isvit", "dopq", "log2", "auto")
"""`act_quantizers` values: the presets of `allocator.activation_bench`, and `auto`."""
EXPORT_FORMATS = ("onnx",)
"""Runtime formats a job can export its model to (`JobSpec.export`, `bitplan export`)."""
SENSITIVITY_METHODS = ("lrp", "fisher", "hessian", "measured")
"""Sensitivity methods a spec may name, alone or joined by '+' (`allocator.sensitivity`)."""
CALIBRATIONS = ("auto", "in-network", "fp32")
"""How a plan's weights are fitted (`allocator.in_network`): each layer on the inputs the
quantized layers before it produce ("in-network"), or each on FP32 inputs ("fp32": faster, and
what jobs did before); "auto" fits the uniform plan both ways and keeps the way that stays closer
to FP32 on held-out samples (`Workbench.choose_fit`): in-network fits help CNNs and can overfit
the wide layers of a transformer."""
MAX_CONTEXT_ROUNDS = 5
MAX_STATISTICS_PARTS = 64
MAX_PINS = 10_000
MAX_SEED = 2**32 - 1
MAX_TEXT = {
    "model": 2048,
    "calib": 4096,
    "weights": 4096,
    "eval": 4096,
    "budget": 200,
    "latency_table": 4096,
}
"""Longest accepted text per field; the rest are short names checked against their lists."""
MAX_LAYER_NAME = 512
MAX_DEVICE_INDEX = 63
"""Highest `cuda:N` a spec may name: more GPUs than one host has, so any real index passes and
a tenant's `cuda:99999999` is refused before a worker looks for it."""
_DEVICE = re.compile(r"cpu|cuda(?::(\d{1,2}))?")


@dataclass(frozen=True)
class FixedActs:
    """Every activation at one width: one of `ACT_BITS`, or `FLOAT_ACT_BITS` for float
    activations (how BOPs count them)."""

    bits: int

    @property
    def choices(self) -> tuple[int, ...]:
        """The widths the integer program may give a layer's input: this one."""
        return (self.bits,)

    @property
    def widest(self) -> int:
        return self.bits

    @property
    def baseline_bits(self) -> int:
        """The activation width of the uniform plan the job is compared with."""
        return self.bits


@dataclass(frozen=True)
class JointActs:
    """Joint allocation: the integer program chooses each layer's input width among `widths`
    together with its weight width (a cost table column per pair, weight-major).

    `baseline_bits` is the width of what the program does not choose: attention probabilities
    (they feed no layer of the table) and the uniform plan the job is compared with.
    """

    widths: tuple[int, ...]
    baseline_bits: int = PROBS_ACT_BITS

    @property
    def choices(self) -> tuple[int, ...]:
        return self.widths

    @property
    def widest(self) -> int:
        """The width pinned layers' inputs run at."""
        return max(self.widths)


ActWidths = FixedActs | JointActs
"""The activation widths of a job, a solve or a cost table: one width, or a joint choice."""
FLOAT_ACTS = FixedActs(FLOAT_ACT_BITS)
"""Float activations, as the integer program prices them."""


def parse_method(text: str) -> tuple[str, ...]:
    """`lrp+fisher` -> ("lrp", "fisher"); unknown names raise `UnknownMethod`."""
    names = tuple(part.strip() for part in text.split("+") if part.strip())
    unknown = [n for n in names if n not in SENSITIVITY_METHODS]
    if not names or unknown:
        raise UnknownMethod(
            f"unknown sensitivity method {text!r}: use one of {', '.join(SENSITIVITY_METHODS)}"
            " or several joined by '+', e.g. lrp+fisher"
        )
    return names


# --- the job and its result ---------------------------------------------------------------------


@dataclass(frozen=True)
class JobSpec:
    """Everything that defines a job; JSON-serialisable as is (`asdict`)."""

    model: str
    calib: str
    weights: str | None = None
    eval: str | None = None
    budget: str = "avg-bits=4"
    method: str = "lrp+fisher"
    bits: tuple[int, ...] = DEFAULT_BITS
    calib_samples: int = 256
    batch_size: int = 32
    eval_samples: int | None = None
    pin_first_last: bool = True
    pins: Mapping[str, int] = field(default_factory=dict)
    bias_correction: bool = True
    time_limit: float = 10.0
    seed: int = 0
    report_widths: bool = True
    """Also evaluate uniform W3..W8 (those in `bits`) for the report's predicted-vs-measured
    ranking: one quantization and one evaluation pass each."""
    report: bool = True
    """Draw report.html and pareto.png with the artifacts (about a second of plotting); bulk
    jobs that only need the plan turn it off."""
    reuse: bool = True
    """Reuse what earlier jobs computed on the same weights, data and options (statistics,
    cost tables, fits, evaluations: `allocator.cache`) and keep this job's for later ones."""
    act_bits: int | str | None = None
    """Activation width of every site, or "auto" to allocate them with the weights (joint
    integer program). None: float activations, unless the budget is `match=WxAy`, which sets y.
    The wire form; `act_widths(spec, budget)` reads it into an `ActWidths`."""
    act_quantizers: str = "auto"
    calibration: str = "auto"
    """One of `CALIBRATIONS`."""
    context_rounds: int = 2
    """Rounds of costs re-measured around the plan, each kept only when it moves the held-out
    divergence down (`allocator.context_costs`); 0 solves once."""
    statistics_parts: int = 1
    """Cut the statistics phase (per-layer statistics and GPTQ) into this many blocks of layers
    that other workers of the service may compute at once (`allocator.split`); the plan is
    the one a single worker finds. Where no other worker can help (`bitplan run`, the embedded
    service) the job computes every part itself."""
    export: tuple[str, ...] = ()
    """Runtime formats (of `EXPORT_FORMATS`) to export the model to as part of the job, each
    checked in its runtime (`allocator.export`); a finished job can also be exported later."""
    latency_table: str | None = None
    """A stored latency table (`bitplan profile-latency`, `POST /v1/latency-tables`) by id, or
    on the machine that runs the job a table's JSON file: what a latency budget is priced on,
    and with it the report measures FP32, uniform and mixed end to end."""
    latency_runtime: str | None = None
    """Measure the latency table in the job, on this runtime (`LATENCY_RUNTIMES`) of the
    machine that runs it, at one evaluation sample's shape; stored for later jobs. A latency
    budget needs this or `latency_table`."""
    device: str | None = None
    """Where the job's tensors live: "cpu", "cuda" or "cuda:N" (`allocator.device`). None
    leaves it to what runs the job: `bitplan run` takes `--device` or `BITPLAN_DEVICE`, a worker
    its own (`bitplan worker --device`, `BITPLAN_DEVICE`), and the library the CPU. A job
    asking for CUDA on a machine without it fails at once, in one line."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["bits"] = list(self.bits)
        data["pins"] = dict(self.pins)
        data["export"] = list(self.export)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobSpec:
        values = dict(data)
        if "bits" in values:
            values["bits"] = tuple(int(b) for b in values["bits"])
        if "export" in values:
            values["export"] = tuple(values["export"])
        return cls(**values)

    def validate(self, limits: Limits | None = None) -> None:
        """Cheap checks before any model is loaded, so bad input fails in milliseconds.

        Every number is bounded (by `limits`, the operator's, where a machine's size decides):
        a spec is written by a tenant, and a width of 1000 bits, a NaN time limit or a batch of
        10^12 samples must be refused here, not discovered by a worker running out of memory.
        """
        limits = limits or Limits()
        for name, longest in MAX_TEXT.items():
            value = getattr(self, name)
            if value is not None and len(value) > longest:
                raise BadSpec(f"{name} is longer than {longest} characters; shorten it")
        budget = parse_budget(self.budget)
        parse_method(self.method)
        _check_widths("bits", self.bits)
        if len(set(self.bits)) != len(self.bits):
            raise BadSpec(f"bits {list(self.bits)} lists a width twice; list each once")
        if self.act_bits not in (None, JOINT, *ACT_BITS):
            raise BadBudget(
                f"activation bits {self.act_bits!r} is not one of "
                f"{', '.join(map(str, ACT_BITS))} or {JOINT}"
            )
        act_widths(self, budget)
        if self.act_quantizers not in ACT_QUANTIZERS:
            raise UnknownMethod(
                f"unknown activation quantizers {str(self.act_quantizers)[:40]!r}; use one of "
                f"{', '.join(ACT_QUANTIZERS)}"
            )
        if self.calibration not in CALIBRATIONS:
            raise BadSpec(
                f"calibration {str(self.calibration)[:40]!r} is not one of {', '.join(CALIBRATIONS)}"
            )
        _check_range("context_rounds", self.context_rounds, 0, MAX_CONTEXT_ROUNDS)
        _check_range("statistics_parts", self.statistics_parts, 1, MAX_STATISTICS_PARTS)
        check_export_formats(self.export)
        if self.latency_runtime is not None:
            check_runtime(self.latency_runtime)
        if budget.needs_latency and self.latency_table is None and self.latency_runtime is None:
            raise BadBudget(
                f"budget {self.budget!r} has a latency term, which needs a latency table: name "
                "a stored one (latency_table, from bitplan profile-latency) or have the job "
                "measure one (latency_runtime: onnxruntime-cpu, torch-cpu or torch-cuda)"
            )
        check_device(self.device)
        _check_range("calib_samples", self.calib_samples, 1, limits.max_calib_samples)
        _check_range("batch_size", self.batch_size, 1, limits.max_batch_size)
        if self.eval_samples is not None:
            _check_range("eval_samples", self.eval_samples, 1, limits.max_eval_samples)
        _check_range("seed", self.seed, 0, MAX_SEED)
        if not (
            math.isfinite(self.time_limit) and 0 < self.time_limit <= limits.max_solver_seconds
        ):
            raise BadSpec(
                f"time_limit {self.time_limit} is not a number of seconds in "
                f"(0, {limits.max_solver_seconds:g}]; give a finite positive limit"
            )
        if len(self.pins) > MAX_PINS:
            raise BadSpec(f"{len(self.pins)} pins is above the limit of {MAX_PINS}")
        for layer, width in self.pins.items():
            if not layer or len(layer) > MAX_LAYER_NAME:
                raise BadSpec(f"pin layer names must be 1 to {MAX_LAYER_NAME} characters")
            _check_widths(f"pin {layer[:80]}", (width,))


def check_export_formats(formats: tuple[str, ...] | list[str]) -> None:
    """Each format once, each one of `EXPORT_FORMATS`."""
    if (
        isinstance(formats, str)
        or not all(isinstance(name, str) for name in formats)
        or len(set(formats)) != len(formats)
    ):
        raise BadSpec('export lists formats, each once, e.g. ["onnx"]')
    for name in formats:
        if name not in EXPORT_FORMATS:
            raise BadSpec(
                f"export format {str(name)[:40]!r} is not one of {', '.join(EXPORT_FORMATS)}"
            )


def check_device(device: object) -> None:
    """None, "cpu", "cuda" or "cuda:N" with N in 0..`MAX_DEVICE_INDEX`; whether the machine
    has it is the worker's question (`allocator.device.resolve`), not the spec's."""
    if device is None:
        return
    found = _DEVICE.fullmatch(device) if isinstance(device, str) else None
    if found is None or int(found.group(1) or 0) > MAX_DEVICE_INDEX:
        raise BadSpec(
            f"device {str(device)[:40]!r} is not cpu, cuda or cuda:N with N in "
            f"0..{MAX_DEVICE_INDEX}; give one of those"
        )


def _check_widths(what: str, widths: tuple[int, ...]) -> None:
    allowed = ", ".join(map(str, WEIGHT_BITS))
    if not widths:
        raise BadSpec(f"{what} lists no width; give some of {allowed}")
    for width in widths:
        if isinstance(width, bool) or width not in WEIGHT_BITS:
            raise BadSpec(f"{what}: weight width {width!r} is not one of {allowed}")


def _check_range(what: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not low <= value <= high:
        raise BadSpec(f"{what} {value} is outside {low}..{high}; give a value in that range")


def act_widths(spec: JobSpec, budget: Budget) -> ActWidths | None:
    """The activation widths a job runs at, read once from its spec and budget: the one asked
    for, the y of a `match=WxAy` budget, or joint allocation over `ACT_BITS` (`JOINT`). None:
    float activations, nothing quantized."""
    if spec.act_bits == JOINT:
        return JointActs(ACT_BITS, budget.match[1] if budget.match is not None else PROBS_ACT_BITS)
    if isinstance(spec.act_bits, int):
        return FixedActs(spec.act_bits)
    if budget.match is not None:
        if budget.match[1] not in ACT_BITS:
            raise BadBudget(
                f"{budget}: activation width {budget.match[1]} is not one of "
                f"{', '.join(map(str, ACT_BITS))}"
            )
        return FixedActs(budget.match[1])
    return None


@dataclass
class Result:
    """What a job produced; `to_json()` is the object `bitplan run --json` prints."""

    spec: JobSpec
    allocation: list[dict[str, Any]]
    avg_weight_bits: float
    weight_bytes: float
    solver: dict[str, Any]
    metrics: JobMetrics
    timings: dict[str, float]
    plan: BitPlan
    profile: dict[str, Any]
    artifacts: dict[str, str] = field(default_factory=dict)
    job_id: str | None = None
    act_allocation: list[dict[str, Any]] | None = None
    bops: float = 0.0
    phases: dict[str, dict[str, float | int | None]] = field(default_factory=dict)
    """Per phase: seconds, model calls (`forwards`) over how many `samples`, and peak resident
    memory in MB (`allocator.clock.Clock`)."""
    reused: dict[str, int] = field(default_factory=dict)
    """How many results of each kind ("statistics", "sensitivity", "fits", "evaluations",
    "held-out checks") came from earlier jobs on the same content instead of being computed."""
    device: dict[str, Any] = field(default_factory=dict)
    """Where the job ran: `device` ("cpu", "cuda:0"), for a GPU its model (`gpu`) and memory
    (`gpu_memory_gb`), and the batch sizes it used (`calibration_batch_size`,
    `evaluation_batch_size`: a GPU's follow its free memory, `allocator.device`)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "model": self.spec.model,
            "budget": self.spec.budget,
            "method": self.spec.method,
            "allocation": self.allocation,
            "avg_weight_bits": self.avg_weight_bits,
            "weight_bytes": self.weight_bytes,
            "solver": self.solver,
            "metrics": self.metrics.to_dict(),
            "timings": self.timings,
            "artifacts": self.artifacts,
            "act_allocation": self.act_allocation,
            "bops": self.bops,
            "phases": self.phases,
            "reused": self.reused,
            "device": self.device,
        }
